"""The listener notices a subscription that redis-py rebuilt by itself, below it."""

from __future__ import annotations

import pytest

from testpulse.bus.broker import ClusterManager
from testpulse.bus.link import PLAIN, PubSubLink

pytestmark = pytest.mark.unit


async def test_a_second_confirmation_of_a_links_channels_asks_for_a_catch_up() -> None:
    # No Redis is reached: the client connects lazily, and this drives only the confirmation logic.
    manager = ClusterManager("redis://127.0.0.1:9/0", key=b"k" * 32)
    subscriptions = manager._subscriptions
    caught_up: list[None] = []
    manager.on_resubscribed = lambda: caught_up.append(None)
    probe = "testpulse:probe:here"
    link = PubSubLink(None, PLAIN, subscriptions, manager._dispatch, probe_channel=probe, probe_timeout=3.0)
    link.on_confirmed = manager.topology._confirmed_on  # type: ignore[attr-defined]
    link.retarget(subscriptions.needed())
    link.up = True
    link.requested = {manager.channel, probe}
    for channel in (manager.channel, probe):
        link._confirm(channel)
    assert caught_up == [], "a first subscription after our own connect is handled by the catch-up it asked for"

    # redis-py reconnected on its own and re-sent SUBSCRIBE for every channel it had.
    for channel in (manager.channel, probe):
        link._confirm(channel)
    assert caught_up == [None]
    await manager.redis.aclose()
