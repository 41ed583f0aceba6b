"""create_app(settings) -> ASGI app: Starlette routes + Socket.IO; the lifespan opens and closes infra."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import socketio
from starlette.applications import Starlette

from server import __version__, metrics
from server.auth import TokenVerifier
from server.broker import NodeBroadcast
from server.delivery import Feeds
from server.http import HttpApi
from server.protocol import ProtocolError
from server.realtime import Realtime, TestpulseServer
from server.sessions import Hub
from server.settings import Settings
from server.store import Database, SqlStore
from server.writer import GroupCommitLog

log = logging.getLogger("testpulse.app")


class Node:
    """Everything one testpulse node runs, wired once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.draining = False
        self.db = Database(
            settings.database_url, pool_size=settings.database_pool_size, timeout=settings.database_timeout_seconds
        )
        self.store = SqlStore(self.db)
        self.log = GroupCommitLog(self.store, batch_max=settings.write_batch_max, queue_max=settings.write_queue_max)
        origins: str | list[str] = "*" if "*" in settings.allowed_origins else list(settings.allowed_origins)
        self.sio = TestpulseServer(
            async_mode="asgi",
            cors_allowed_origins=origins,
            max_http_buffer_size=settings.max_payload_bytes,
            ping_interval=settings.ping_interval_seconds,
            ping_timeout=settings.ping_timeout_seconds,
            logger=False,
            engineio_logger=False,
        )
        self.feeds = Feeds(
            self.sio,
            self.log,
            page_size=settings.replay_page_size,
            client_queue_max=settings.client_queue_max,
            gap_fill_delay=settings.gap_fill_delay_seconds,
            on_slow_consumer=lambda sid: self.realtime.drop_slow_consumer(sid),
        )
        self.hub = Hub(self.store, self.log, NodeBroadcast(self.sio, self.feeds))
        verifier = TokenVerifier(settings)
        self.realtime = Realtime(self.sio, self.hub, self.feeds, verifier, settings, lambda: self.draining)
        self.http = HttpApi(self.hub, verifier, max_body=settings.max_payload_bytes, readiness=self.readiness)

    async def start(self) -> None:
        metrics.NODE_INFO.labels(self.settings.node_id, __version__).set(1)
        await self.db.create_schema()
        self.log.start()
        log.info("node %s ready (database %s)", self.settings.node_id, self.db.url.split("://")[0])

    async def drain(self) -> None:
        """Refuse new handshakes, send clients elsewhere, commit what is queued."""
        if self.draining:
            return
        self.draining = True
        await self.realtime.disconnect_all("server_draining", "this node is shutting down; reconnect")
        await self.log.close(self.settings.shutdown_timeout_seconds)

    async def stop(self) -> None:
        await self.drain()
        await self.db.close()

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.db.ping(), self.settings.database_timeout_seconds)
            checks["database"] = "ok"
        except (ProtocolError, TimeoutError, OSError) as exc:
            checks["database"] = f"failing: {getattr(exc, 'message', exc) or type(exc).__name__}"
        if self.draining:
            checks["node"] = "draining"
        return checks


def create_app(settings: Settings) -> Any:
    node = Node(settings)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await node.start()
        try:
            yield
        finally:
            await node.stop()

    web = Starlette(routes=node.http.routes(), lifespan=lifespan)
    web.state.node = node
    app = socketio.ASGIApp(node.sio, other_asgi_app=web, socketio_path="socket.io")
    app.node = node
    return app
