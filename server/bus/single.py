"""One Redis server: one pub/sub link holding every channel this node needs, reconnected with
jittered backoff whenever it fails or goes deaf."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from testpulse import metrics
from testpulse.bus.link import PLAIN, Backoff, PubSubLink
from testpulse.bus.topology import Wiring

log = logging.getLogger("testpulse.bus.broker")

REPEAT_SENDERS_MAX = 1024  # senders the repeat filter remembers


class SingleRedis:
    """The Topology of a plain `redis://`, `rediss://` or `unix://` URL."""

    sharded = False
    repeat_keys_max = REPEAT_SENDERS_MAX

    def __init__(self, wiring: Wiring) -> None:
        self._wiring = wiring
        self._subscriptions = wiring.subscriptions
        self._probe_channel = wiring.probe_prefix
        self._backoff = Backoff(wiring.backoff_max)
        self._link: PubSubLink | None = None
        self._client: Any = None
        self._last_heard = time.monotonic()
        self._subscriptions.on_change = self._retarget

    @property
    def link(self) -> PubSubLink | None:
        return self._link

    async def listen_forever(self) -> None:
        first = True
        while True:
            try:
                link = await self._connect()
                if not first:
                    metrics.REDIS_RECONNECTS.inc()
                first = False
                self._backoff.reset()
                await link.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect
                log.warning("Redis subscription lost (%s: %s); reconnecting", type(exc).__name__, exc)
            await self._drop()
            await asyncio.sleep(self._backoff.next_delay())

    async def _connect(self) -> PubSubLink:
        self._client = self._wiring.clients.new()
        link = PubSubLink(
            self._client.pubsub(),
            PLAIN,
            self._subscriptions,
            self._wiring.dispatch,
            probe_channel=self._probe_channel,
            probe_timeout=self._wiring.probe_timeout,
        )
        link.on_confirmed = self._confirmed_on
        link.retarget(self._subscriptions.needed())
        self._link = link
        self._subscriptions.lost()  # whatever was published before this connection is in the store
        async with asyncio.timeout(self._wiring.connect_timeout):
            await link.open()
        return link

    async def _drop(self) -> None:
        link, self._link = self._link, None
        client, self._client = self._client, None
        if link is not None:
            self._last_heard = link.last_heard
            await link.close()
        if client is not None:
            with contextlib.suppress(Exception):  # being thrown away anyway
                async with asyncio.timeout(1.0):
                    await client.aclose()

    def _retarget(self) -> None:
        if self._link is not None:
            self._link.retarget(self._subscriptions.needed())

    def _confirmed_on(self, link: PubSubLink, _channel: str) -> None:
        if link.whole():
            self._subscriptions.catch_up_if_whole(link.confirmed())

    async def probe_once(self) -> None:
        if self._link is None or not self._link.up:
            return
        try:
            async with asyncio.timeout(self._wiring.connect_timeout):
                await self._wiring.redis.publish(self._probe_channel, self._wiring.sign({"method": "probe"}))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failed probe shows up as probe age
            pass

    def confirmed(self) -> set[str]:
        return self._link.confirmed() if self._link is not None else set()

    def reachable(self, channel: str) -> bool:
        return self._link is not None and self._link.up

    def probe_age(self) -> float:
        last = self._link.last_heard if self._link is not None else self._last_heard
        return time.monotonic() - last

    def failure(self) -> str | None:
        if self._link is None or not self._link.up:
            return "subscription is down"
        return None

    def repeat_key(self, sender: str, channel: str) -> str:
        # One connection hears each sender's numbers rising, whatever the channel.
        return sender

    def export_series(self) -> None:
        pass

    async def close(self) -> None:
        await self._drop()
