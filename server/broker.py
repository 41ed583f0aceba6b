"""Broadcast to session rooms: local feeds now, and the cross-node plumbing when Redis is configured."""

from __future__ import annotations

import socketio

from server import metrics
from server.delivery import Feeds, session_room
from server.sessions import StoredDetection, Transition

_UPDATES = metrics.EVENTS_EMITTED.labels("test_session_update")


class NodeBroadcast:
    """Broadcast port for one node: session updates go through the Socket.IO manager (which spans
    nodes when it is a Redis manager), detections go to this node's ordered feeds."""

    def __init__(self, sio: socketio.AsyncServer, feeds: Feeds) -> None:
        self._sio = sio
        self._feeds = feeds

    async def session_changed(self, transition: Transition) -> None:
        await self._sio.emit("test_session_update", transition.update(), room=session_room(transition.session.id))
        _UPDATES.inc()

    async def detections(self, session_id: str, items: list[StoredDetection]) -> None:
        self._feeds.offer(session_id, items)
