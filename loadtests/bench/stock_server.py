"""The baseline: a stock python-socketio cluster node with the same events, nothing more.

socketio.AsyncRedisManager (one Redis channel that every node decodes entirely), uvicorn's
defaults, no authentication, no database:
- `join_session {session_id}` enters the room `session:<id>` and acks `{ok: true}`;
- `publish_detection {...}` takes a seq from Redis (INCR per session, so seqs are cluster-wide
  like testpulse's), emits `detection_event` to the room and acks `{ok: true, seq}`; handlers run
  concurrently (python-socketio's default), so seqs can reach viewers out of order;
- `publish_detections {session_id, detections}` does the same for a batch (INCRBY).

Run as `STOCK_REDIS_URL=redis://... uvicorn loadtests.bench.stock_server:app --port P`.
`GET /health` answers 200; `GET /stats` reports connected clients and, for the routing comparison,
how many messages this node received from Redis and how many of those were emits to rooms with no
member on this node (decoded for nothing). The counting wraps the manager and changes nothing else.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import socketio
from redis import asyncio as aioredis

REDIS_URL = os.environ.get("STOCK_REDIS_URL", "redis://127.0.0.1:6379/0")
NODE_ID = os.environ.get("STOCK_NODE_ID", "stock")


class CountingRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """AsyncRedisManager that counts what it receives; behaviour unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received = 0  # every message read from the channel (each is decoded)
        self.remote_emits = 0  # emits from other nodes
        self.remote_emits_unwatched = 0  # ... to a room with no member on this node

    async def _listen(self) -> Any:
        async for message in super()._listen():
            self.received += 1
            yield message

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        if message.get("host_id") != self.host_id:
            self.remote_emits += 1
            room = message.get("room")
            if room is not None and not self.rooms.get(message.get("namespace") or "/", {}).get(room):
                self.remote_emits_unwatched += 1
        await super()._handle_emit(message)


manager = CountingRedisManager(REDIS_URL)
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins="*")
# The seq counter's own client waits for a free connection rather than failing when more than
# max_connections handlers are in flight (redis-py's default pool raises MaxConnectionsError at 100):
# the baseline should not fail because of how this benchmark chose to number detections.
redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=100))
clients = 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
    global clients
    clients += 1
    return True


@sio.event
async def disconnect(sid: str, reason: Any = None) -> None:
    global clients
    clients -= 1


@sio.event
async def join_session(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    session_id = str(data["session_id"])
    await sio.enter_room(sid, f"session:{session_id}")
    return {"ok": True, "session": {"id": session_id}, "replayed": 0}


def _event(session_id: str, seq: int, item: dict[str, Any], received_at: str) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "seq": seq,
        "label": item.get("label"),
        "confidence": item.get("confidence"),
        "bbox": item.get("bbox"),
        "frame": item.get("frame"),
        "ts": item.get("ts"),
        "attributes": item.get("attributes"),
        "received_at": received_at,
    }


@sio.event
async def publish_detection(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    session_id = str(data["session_id"])
    seq = int(await redis.incr(f"stock:seq:{session_id}"))
    await sio.emit("detection_event", _event(session_id, seq, data, _now()), room=f"session:{session_id}")
    return {"ok": True, "seq": seq}


@sio.event
async def publish_detections(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    session_id = str(data["session_id"])
    items = list(data["detections"])
    last = int(await redis.incrby(f"stock:seq:{session_id}", len(items)))
    first = last - len(items) + 1
    received_at = _now()
    for offset, item in enumerate(items):
        await sio.emit(
            "detection_event", _event(session_id, first + offset, item, received_at), room=f"session:{session_id}"
        )
    return {"ok": True, "first_seq": first, "last_seq": last}


async def http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/health":
        status, body = 200, {"status": "healthy"}
    elif scope["path"] == "/stats":
        status, body = (
            200,
            {
                "node": NODE_ID,
                "clients": clients,
                "redis_received": manager.received,
                "remote_emits": manager.remote_emits,
                "remote_emits_unwatched": manager.remote_emits_unwatched,
            },
        )
    else:
        status, body = 404, {"error": "not found"}
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


app = socketio.ASGIApp(sio, other_asgi_app=http_app)
