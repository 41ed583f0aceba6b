"""The listener notices a subscription that redis-py rebuilt by itself, below it."""

from __future__ import annotations

import pytest

from testpulse.bus.broker import ClusterManager

pytestmark = pytest.mark.unit


def test_a_second_confirmation_of_the_control_channel_asks_for_a_catch_up() -> None:
    # No Redis is reached: the client connects lazily, and this drives only the confirmation logic.
    manager = ClusterManager("redis://127.0.0.1:9/0", key=b"k" * 32)
    caught_up: list[None] = []
    manager.on_resubscribed = lambda session_id=None: caught_up.append(None)
    for channel in (manager.channel, manager._probe_channel):
        manager._confirm(channel)
    assert caught_up == [], "a first subscription after our own connect is handled by _open_pubsub"

    # redis-py reconnected on its own and re-sent SUBSCRIBE for every channel it had.
    for channel in (manager.channel, manager._probe_channel):
        manager._confirm(channel)
    assert caught_up == [None]
