"""A Sentinel-managed Redis: one server's topology that also follows the master the Sentinels name.

A connection opened before a failover does not notice it (server/bus/clients.py says why), so at
every probe tick this asks where the master is now; when it moved, the publishing client's
connections are closed (each reconnects to the new master), the listening link is given up (the
listener reconnects there), and every node is asked to re-read the store: until every node has
moved, some publish on the old master while others listen on the new one. The resync goes out on
the new master, where the nodes that moved earlier listen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from testpulse.bus.single import SingleRedis
from testpulse.bus.topology import Wiring

log = logging.getLogger("testpulse.bus.broker")


class SentinelRedis(SingleRedis):
    """The Topology of a `redis+sentinel://` URL."""

    def __init__(self, wiring: Wiring, announce_resync: Callable[[], None]) -> None:
        super().__init__(wiring)
        self._announce_resync = announce_resync

    async def probe_once(self) -> None:
        if self._link is not None and self._link.up:
            await self._follow_master()
        await super().probe_once()

    async def _follow_master(self) -> None:
        link, listener = self._link, self._client
        clients = self._wiring.clients
        try:
            async with asyncio.timeout(self._wiring.connect_timeout):
                publisher_moved = await clients.master_moved(self._wiring.redis)
                listener_moved = listener is not None and await clients.master_moved(listener)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Sentinels unreachable or mid-failover: ask again next tick
            log.debug("asking the Sentinels for the master failed: %s", exc)
            return
        if listener_moved and link is not None and link is self._link:
            link.condemn("Sentinel names a new Redis master: resubscribing there")
        if publisher_moved or listener_moved:
            log.warning("Sentinel names a new Redis master; moving to it")
            self._announce_resync()
