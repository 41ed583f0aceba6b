"""The hub's Broadcast port on a node: its own feeds at once, the other nodes through the cluster manager."""

from __future__ import annotations

import asyncio

import socketio

from testpulse.bus.broker import ClusterManager
from testpulse.domain.sessions import StoredDetection, Transition
from testpulse.realtime.feeds import Feeds

BACKPRESSURE_PATIENCE_SECONDS = 2.0  # a publisher held longer than this is told rate_limited


class NodeBroadcast:
    """Broadcast port: session updates go through the Socket.IO manager (cross-node when it is a
    ClusterManager); detections go to other nodes by Redis, then to this node's feeds, after the ack."""

    def __init__(self, sio: socketio.AsyncServer, feeds: Feeds, cluster: ClusterManager | None) -> None:
        self._sio = sio
        self._feeds = feeds
        self._cluster = cluster

    async def session_changed(self, transition: Transition) -> None:
        # Through the feeds, like detections, so that a viewer's node can tell a missed change
        # from a repeated one and make good what it missed from the store.
        update = transition.update()
        self._feeds.session_changed(update)
        if self._cluster is not None:
            self._cluster.publish_status(update)

    async def admit(self, session_id: str) -> None:
        await self._feeds.wait_for_room(session_id, patience=BACKPRESSURE_PATIENCE_SECONDS)

    async def detections(self, session_id: str, items: list[StoredDetection]) -> None:
        if self._cluster is not None:
            self._cluster.publish_detections(session_id, items)
        # The publisher's ack goes out before this node's viewers get their frames: the offer runs
        # in the next callback, once the handler has queued the ack (in this loop turn, as the
        # handler does not suspend again), so the flusher writes the ack first instead of after a
        # socket write per local viewer. Viewers lose nothing by it: the feed orders by seq.
        asyncio.get_running_loop().call_soon(self._feeds.offer, session_id, items)
