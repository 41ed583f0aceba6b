"""create_app(settings) -> ASGI app: Starlette routes + Socket.IO; the lifespan opens and closes infra."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import socketio
from starlette.applications import Starlette

from testpulse import __version__, gctune, jsoncodec, metrics
from testpulse.bus.broker import ClusterManager, cluster_key
from testpulse.bus.presence import RedisBoard
from testpulse.domain import disconnects
from testpulse.domain.auth import TokenVerifier
from testpulse.domain.keyring import Keyring
from testpulse.domain.presence import LocalBoard, Presence, PresenceBoard
from testpulse.domain.protocol import ErrorCode, ProtocolError
from testpulse.domain.sessions import Hub, Status
from testpulse.http.api import HttpApi
from testpulse.jwks import UrlKeySource
from testpulse.realtime.broadcast import NodeBroadcast
from testpulse.realtime.feeds import Feeds
from testpulse.realtime.handlers import Realtime, server_class
from testpulse.settings import Settings
from testpulse.store.auto import open_database
from testpulse.store.repository import SqlStore
from testpulse.store.retention import Retention
from testpulse.store.writer import GroupCommitLog
from testpulse.transport import auto

log = logging.getLogger("testpulse.app")


class Node:
    """Everything one testpulse node runs, wired once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.draining = False
        self._sampler: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._expirer: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self.db = open_database(
            settings.database_url, pool_size=settings.database_pool_size, timeout=settings.database_timeout_seconds
        )
        self.store = SqlStore(self.db)
        self.log = GroupCommitLog(self.store, batch_max=settings.write_batch_max, queue_max=settings.write_queue_max)
        origins: str | list[str] = "*" if "*" in settings.allowed_origins else list(settings.allowed_origins)
        self.cluster = (
            ClusterManager(settings.redis_url, key=cluster_key(settings.cluster_key_secret))
            if settings.redis_url
            else None
        )
        self.transport = auto.select(settings.transport)
        self.sio = server_class(self.transport)(
            async_mode="asgi",
            client_manager=self.cluster,
            sid_tag=sid_tag(settings.node_id),
            cors_allowed_origins=origins,
            max_http_buffer_size=settings.max_payload_bytes,
            ping_interval=settings.ping_interval_seconds,
            ping_timeout=settings.ping_timeout_seconds,
            logger=False,
            engineio_logger=False,
            json=jsoncodec,
        )
        self.sio.eio.write_timeout = settings.write_timeout_seconds
        self.feeds = Feeds(
            self.sio,
            self.log,
            self.store,
            page_size=settings.replay_page_size,
            client_queue_max=settings.client_queue_max,
            gap_fill_delay=settings.gap_fill_delay_seconds,
            on_slow_consumer=lambda sid: self.realtime.drop_slow_consumer(sid),
        )
        self.hub = Hub(self.store, self.log, NodeBroadcast(self.sio, self.feeds, self.cluster))
        self.presence = Presence(self._presence_board(), self.feeds.send_many)
        self.keyring = (
            Keyring(UrlKeySource(settings.jwks_url), refresh_seconds=settings.jwks_refresh_seconds)
            if settings.jwks_url
            else None
        )
        self._keyring_task: asyncio.Task[None] | None = None
        verifier = TokenVerifier(settings, self.keyring)
        self.realtime = Realtime(
            self.sio, self.hub, self.feeds, verifier, settings, lambda: self.draining, self.presence
        )
        self.http = HttpApi(
            self.hub, verifier, max_body=settings.max_payload_bytes, readiness=self.readiness, presence=self.presence
        )

    def _presence_board(self) -> PresenceBoard:
        if self.cluster is None:
            return LocalBoard()
        # Per process, not per node id: a node restarted under its old id must not revive its old members.
        instance = f"{self.settings.node_id}:{secrets.token_hex(4)}"
        return RedisBoard(self.cluster.redis, instance, announce=self.cluster.publish_presence)

    async def start(self) -> None:
        metrics.NODE_INFO.labels(self.settings.node_id, __version__, self.transport).set(1)
        metrics.NODE_DRAINING.set(0)
        metrics.initialize_series([*self.realtime.handlers(), "unknown"], [code.value for code in ErrorCode])
        schema_state = await self.db.migrate(automatic=self.settings.migrates_on_start)
        log.info("database schema at revision %s", schema_state.revision)
        self.log.start()
        self._sampler = asyncio.create_task(self._sample_forever(), name="testpulse-sampler")
        self._sweeper = asyncio.create_task(self.feeds.sweep_forever(), name="testpulse-feed-sweeper")
        self._expirer = asyncio.create_task(self.realtime.expire_forever(), name="testpulse-token-expiry")
        self._presence_task = asyncio.create_task(self.presence.run_forever(), name="testpulse-presence")
        if self.keyring is not None:
            # Not awaited: a node starts while the identity provider is down, and refuses its
            # tokens with `unavailable` until a fetch succeeds.
            self._keyring_task = asyncio.create_task(self.keyring.run_forever(), name="testpulse-jwks")
        if self.settings.retention_days > 0:
            retention = Retention(
                self.store,
                days=self.settings.retention_days,
                batch_rows=self.settings.retention_batch_rows,
                pause_seconds=self.settings.retention_pause_seconds,
                check_seconds=self.settings.retention_check_seconds,
            )
            self._retention_task = asyncio.create_task(retention.run_forever(), name="testpulse-retention")
        if self.cluster is not None:
            self.cluster.on_detections = self.feeds.offer
            self.cluster.on_status = self.feeds.session_changed
            self.cluster.on_resubscribed = self.feeds.resync
            self.cluster.on_presence = self.presence.remote_changed
            # Subscribe now, not at the first client connection as python-socketio would.
            self.sio.manager_initialized = True
            self.cluster.initialize()
        gctune.tune_for_long_lived_connections()
        log.info(
            "node %s ready (database %s, %s transport)",
            self.settings.node_id,
            self.db.url.split("://")[0],
            self.transport,
        )

    async def drain(self) -> None:
        """Refuse new handshakes, send clients elsewhere, commit what is queued, flush the outbox.

        Every step has a share of the grace and none can starve the next: the queued appends and
        the outbox are always given their turn before the process exits."""
        if self.draining:
            return
        self.draining = True
        metrics.NODE_DRAINING.set(1)
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_timeout_seconds
        deadline = loop.time() + grace
        sockets = await self.realtime.disconnect_all(disconnects.SERVER_DRAINING)
        # The `error` events and CLOSE packets should leave before the process does, but a client
        # that does not read (or a long-polling one between polls) must not hold the drain.
        unsent = await _wait_flushed(sockets, min(DRAIN_FLUSH_SHARE * grace, 2.0))
        await self.log.close(max(0.1, deadline - loop.time()))
        outbox_flushed = True
        if self.cluster is not None:
            outbox_flushed = await self.cluster.flush(max(0.1, deadline - loop.time()))
        log.info(
            "drained in %.2fs: %d clients sent elsewhere (%d with packets still unsent), queued detections "
            "committed or answered, outbox %s",
            grace - (deadline - loop.time()),
            len(sockets),
            unsent,
            "flushed" if outbox_flushed else "NOT flushed",
        )

    async def _sample_forever(self) -> None:
        """Gauges that are read, not counted: event-loop lag and room membership every second,
        sessions by status (a cheap GROUP BY) every ten."""
        loop = asyncio.get_running_loop()
        tick = 0
        while True:
            started = loop.time()
            await asyncio.sleep(1.0)
            metrics.EVENT_LOOP_LAG_SECONDS.set(max(0.0, loop.time() - started - 1.0))
            self.feeds.sample_gauges()
            metrics.PRESENCE_MEMBERS.set(self.presence.member_count())
            if tick % 10 == 0:
                try:
                    counts = await self.store.count_by_status()
                except ProtocolError:
                    counts = None
                if counts is not None:
                    for status in Status:
                        metrics.SESSIONS_BY_STATUS.labels(status.value).set(counts.get(status.value, 0))
            tick += 1

    async def stop(self) -> None:
        for task in (
            self._sampler,
            self._sweeper,
            self._expirer,
            self._presence_task,
            self._retention_task,
            self._keyring_task,
        ):
            if task is not None:
                task.cancel()
        await self.drain()
        await self.presence.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self.db.close()

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.db.ping(), self.settings.database_timeout_seconds)
            checks["database"] = "ok"
        except (ProtocolError, TimeoutError, OSError) as exc:
            checks["database"] = f"failing: {getattr(exc, 'message', exc) or type(exc).__name__}"
        if self.cluster is not None:
            checks["redis"] = await self.cluster.health()
        if self.log.failure is not None:
            checks["writer"] = f"failing: {self.log.failure}"
        if self.draining:
            checks["node"] = "draining"
        return checks


DRAIN_FLUSH_SHARE = 0.2  # of the shutdown grace, at most 2 s: for the dropped clients' last packets


async def _wait_flushed(sockets: list[Any], budget: float) -> int:
    """Wait (at most `budget`) until the WebSocket writers of `sockets` have taken everything
    queued; returns how many had not. A long-polling socket's last packets went to the GET it held,
    if any; with none held there is no one to take them, so it is not waited for."""
    writers = [asyncio.ensure_future(s.queue.join()) for s in sockets if s.upgraded and not s.queue.empty()]
    if not writers:
        return 0
    _, pending = await asyncio.wait(writers, timeout=budget)
    for waiter in pending:
        waiter.cancel()
    return len(pending)


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
    sio_app = socketio.ASGIApp(node.sio, other_asgi_app=web, socketio_path="socket.io")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if node.draining and scope["type"] in ("http", "websocket") and _is_handshake(scope):
            # Refused at the HTTP level so the proxy retries the handshake on another node.
            await _refuse_draining(scope, send)
            return
        await sio_app(scope, receive, send)

    app.node = node  # type: ignore[attr-defined]
    return app


def _is_handshake(scope: dict[str, Any]) -> bool:
    path: str = scope.get("path", "")
    return path.startswith("/socket.io") and b"sid=" not in scope.get("query_string", b"")


async def _refuse_draining(scope: dict[str, Any], send: Any) -> None:
    # A WebSocket closed before accept is answered 403 by uvicorn, which the proxy does not retry:
    # send a real 503 through the ASGI denial-response extension wherever the server has it.
    prefix = "http.response"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1013})
            return
        prefix = "websocket.http.response"
    body = json.dumps({"error": {"code": "server_draining", "message": "this node is draining"}}).encode()
    await send(
        {
            "type": f"{prefix}.start",
            "status": 503,
            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")],
        }
    )
    await send({"type": f"{prefix}.body", "body": body})


def sid_tag(node_id: str) -> str:
    """The node's tag in Engine.IO session ids: the node id when it is safe in a URL and a regex."""
    return node_id if re.fullmatch(r"[A-Za-z0-9_-]{1,32}", node_id) else ""
