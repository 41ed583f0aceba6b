"""Socket.IO handlers: authenticate, rate-limit, validate, call the hub, answer; nothing more."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import socketio
from socketio import packet as sio_packet

from testpulse import metrics
from testpulse.domain import disconnects
from testpulse.domain.auth import Action, AuthError, Principal, TokenVerifier
from testpulse.domain.deadlines import Deadlines
from testpulse.domain.disconnects import DisconnectReason
from testpulse.domain.presence import Presence
from testpulse.domain.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    JoinRequest,
    ProtocolError,
    PublishRequest,
    RefreshRequest,
    SessionRef,
    StartRequest,
    StopRequest,
)
from testpulse.domain.ratelimit import KeyedLimiter, TokenBucket
from testpulse.domain.sessions import Hub, Verb, batch_ack, iso, publish_ack, session_room, utcnow
from testpulse.realtime.feeds import Feeds
from testpulse.settings import Settings
from testpulse.transport.auto import Kind, engine_server_class

log = logging.getLogger("testpulse.realtime.handlers")

# Set per incoming event by TestpulseServer: whether the client asked for an acknowledgement.
_wants_ack: contextvars.ContextVar[bool] = contextvars.ContextVar("wants_ack", default=False)


EXPIRY_CHECK_SECONDS = 1.0
POLL_HANDOVER_SECONDS = 1.0  # a dropped long-polling client between polls has this long to take its error
MALFORMED_PACKET_ERRORS = (ValueError, TypeError, IndexError, KeyError, binascii.Error)

# Handler names python-socketio uses itself; a client event by these names is an unknown event.
RESERVED_EVENTS = frozenset({"connect", "disconnect", "connect_error", "*"})


class TestpulseServer(socketio.AsyncServer):  # type: ignore[misc]
    """AsyncServer that tells handlers whether the client sent an ack callback, because the
    contract reports a failure as an `error` event exactly when there is no ack to carry it; that
    treats a client event named like one of python-socketio's own as an unknown event; that ends a
    connection sending a Socket.IO packet it cannot parse; and that greets a connection once its
    CONNECT packet is queued. The two transports do it their own way: `server_class(kind)`."""

    transport_kind: Kind = "stock"

    def __init__(self, *args: Any, sid_tag: str = "", **kwargs: Any) -> None:
        self._sid_tag = sid_tag
        # Called with the sid once a connection is accepted and its CONNECT packet is queued.
        self.on_connected: Callable[[str], None] | None = None
        super().__init__(*args, **kwargs)

    def _engineio_server_class(self) -> type:
        tag = self._sid_tag

        class Tagged(engine_server_class(self.transport_kind)):  # type: ignore[misc]
            sid_tag = tag

        return Tagged

    def connection_accepted(self, sid: str) -> None:
        """Called by the connect handler as it accepts `sid` (before python-socketio answers)."""

    async def _close_malformed(self, eio_sid: str, exc: Exception) -> None:
        # python-socketio raises these on a Socket.IO packet it cannot parse (bad JSON, no
        # event name, unknown type, bad base64): the client's garbage, not a server fault.
        # The connection ends, with one log line (python-engineio would log a traceback per
        # packet and keep reading, so one client could fill the logs).
        log.warning(
            "%s: closing after a malformed Socket.IO packet (%s: %s)", eio_sid, type(exc).__name__, str(exc)[:120]
        )
        socket = self.eio.sockets.get(eio_sid)
        if socket is not None:
            # Without waiting for the queue: a long-polling client may never come to take it.
            await socket.close(wait=False, reason=self.eio.reason.TRANSPORT_ERROR)


class LeanTestpulseServer(TestpulseServer):
    """The lean transport's: overrides of python-socketio internals (server/transport/internals.py)."""

    transport_kind: Kind = "lean"

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        await super()._handle_connect(eio_sid, namespace, data)
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if self.on_connected is not None and sid is not None and self.manager.is_connected(sid, namespace):
            self.on_connected(sid)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        try:
            await super()._handle_eio_message(eio_sid, data)
        except MALFORMED_PACKET_ERRORS as exc:
            await self._close_malformed(eio_sid, exc)

    async def _handle_event_internal(
        self, server: Any, sid: str, eio_sid: str, data: list[Any], namespace: str, id: int | None
    ) -> None:
        _wants_ack.set(id is not None)
        name = data[0] if data else None
        if not isinstance(name, str) or name in RESERVED_EVENTS:
            # python-socketio dispatches whatever name a client sends: `connect` would re-run the
            # handshake on a forged environ (a fresh rate-limit bucket, another token), `disconnect`
            # would drop a live client's state, `*` would call the catch-all with shifted arguments
            # (an `error` event to any sid or room). A quoted name matches no handler: unknown event.
            data = [repr(name)[:80], *data[1:]]
        await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)


class GuardedPacket(socketio.packet.Packet):  # type: ignore[misc]
    """The stock transport's Socket.IO packet (python-socketio's public `serializer` seam): as it
    decodes a client event it records whether an ack was asked for, and quotes a reserved or
    non-string event name, as LeanTestpulseServer does at dispatch. python-socketio decodes in the
    task that then starts the handler's, which inherits the ack flag (a context variable)."""

    # Set by python-socketio's Packet; declared for the type checker (socketio is untyped).
    packet_type: int
    data: Any
    id: int | None

    def decode(self, encoded_packet: Any) -> Any:
        attachments = super().decode(encoded_packet)
        if self.packet_type in (sio_packet.EVENT, sio_packet.BINARY_EVENT):
            _wants_ack.set(self.id is not None)
            data = self.data
            if data:  # empty or missing: python-socketio refuses it as malformed, as on lean
                name = data[0]
                if not isinstance(name, str) or name in RESERVED_EVENTS:
                    self.data = [repr(name)[:80], *data[1:]]
        return attachments

    def add_attachment(self, attachment: Any) -> bool:
        complete = bool(super().add_attachment(attachment))
        if complete:  # the attachments may arrive in another request than the header did
            _wants_ack.set(self.id is not None)
        return complete


class StockTestpulseServer(TestpulseServer):
    """The stock transport's: python-socketio's own dispatch, with our behaviour through public seams."""

    transport_kind: Kind = "stock"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, serializer=GuardedPacket, **kwargs)
        dispatch = self.eio.handlers["message"]

        async def on_message(eio_sid: str, data: Any) -> None:
            try:
                await dispatch(eio_sid, data)
            except MALFORMED_PACKET_ERRORS as exc:
                await self._close_malformed(eio_sid, exc)

        self.eio.on("message", on_message)

    def connection_accepted(self, sid: str) -> None:
        # python-socketio queues the CONNECT packet right after the connect handler returns,
        # without suspending: a callback scheduled now runs once it is queued.
        asyncio.get_running_loop().call_soon(self._greet, sid, GREET_TRIES)

    def _greet(self, sid: str, tries: int) -> None:
        if self.on_connected is None:
            return
        if self.manager.is_connected(sid, "/"):
            self.on_connected(sid)
        elif tries > 0 and self.manager.eio_sid_from_sid(sid, "/") is not None:  # still handshaking
            asyncio.get_running_loop().call_soon(self._greet, sid, tries - 1)


GREET_TRIES = 100  # loop turns a stock greeting waits for python-socketio to finish the handshake


def server_class(kind: Kind) -> type[TestpulseServer]:
    return LeanTestpulseServer if kind == "lean" else StockTestpulseServer


class Refused(socketio.exceptions.ConnectionRefusedError):  # type: ignore[misc]
    """connect_error whose data is {code, message}. `data` repeats both for socket.io-client
    (JavaScript), which exposes only `message` and `data` of the error packet."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error_args = {"code": code, "message": message, "data": {"code": code, "message": message}}


@dataclass(slots=True)
class Connection:
    principal: Principal
    bucket: TokenBucket
    transport: str
    expired: bool = False
    warned: bool = False  # token_expiring was sent for the current token


Handler = Callable[[str, Connection, Any], Awaitable[dict[str, Any]]]


def client_address(environ: dict[str, Any]) -> str:
    # uvicorn has already replaced the peer with X-Forwarded-For when the peer is a trusted proxy
    # (TESTPULSE_TRUSTED_PROXIES); Engine.IO's own REMOTE_ADDR is a constant.
    client = environ.get("asgi.scope", {}).get("client")
    return str(client[0]) if client else "unknown"


def bearer_token(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


class Realtime:
    def __init__(
        self,
        sio: TestpulseServer,
        hub: Hub,
        feeds: Feeds,
        verifier: TokenVerifier,
        settings: Settings,
        is_draining: Callable[[], bool],
        presence: Presence,
    ) -> None:
        self.sio = sio
        self.hub = hub
        self.feeds = feeds
        self.presence = presence
        self.verifier = verifier
        self.settings = settings
        self.is_draining = is_draining
        self.connections: dict[str, Connection] = {}
        self._token_checks: Deadlines[str] = Deadlines()  # when each connection's token is next looked at
        self._handshakes = KeyedLimiter(settings.connect_rate_per_second, settings.connect_rate_burst)
        self._tasks: set[asyncio.Task[Any]] = set()
        sio.on("connect", self.connect)
        sio.on_connected = self._greet
        sio.on("disconnect", self.disconnect)
        sio.on("*", self.unknown_event)
        for event, handler in self.handlers().items():
            sio.on(event, self._wrap(event, handler))

    def handlers(self) -> dict[str, Handler]:
        return {
            "join_session": self.join_session,
            "leave_session": self.leave_session,
            "start_test_session": self.start_session,
            "pause_test_session": self._control(Verb.PAUSE),
            "resume_test_session": self._control(Verb.RESUME),
            "stop_test_session": self.stop_session,
            "publish_detection": self.publish_detection,
            "publish_detections": self.publish_detections,
            "get_presence": self.get_presence,
            "refresh_token": self.refresh_token,
        }

    # ---- connection lifecycle ----------------------------------------------------------------

    async def connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        try:
            principal = await self._admit(environ, auth)
        except Refused as exc:
            metrics.CONNECT_REFUSED.labels(exc.error_args["code"]).inc()
            raise
        conn = Connection(
            principal,
            TokenBucket(self.settings.rate_limit_per_second, self.settings.rate_limit_burst),
            # The transport at handshake: an upgrade later does not move a client between series.
            transport=self.sio.transport(sid),
        )
        self.connections[sid] = conn
        self._schedule_token_check(sid, conn)
        self.feeds.attach(sid)
        self.sio.connection_accepted(sid)
        metrics.CONNECTS.inc()
        metrics.CONNECTED_CLIENTS.labels(conn.transport).inc()
        # python-socketio keeps the handshake's environ for the life of the connection, and with it
        # every request header and a class Engine.IO defines per request: several KB per idle
        # client. Nothing reads it after this handler (the WebSocket has taken its ASGI channels);
        # the ASGI scope's header list, which the server also keeps, is as dead.
        scope = environ.get("asgi.scope")
        if isinstance(scope, dict):
            scope["headers"] = []
        environ.clear()

    async def _admit(self, environ: dict[str, Any], auth: Any) -> Principal:
        if self.is_draining():
            raise Refused("server_draining", "this node is draining; reconnect to another node")
        if not self._handshakes.allow(client_address(environ)):
            metrics.RATE_LIMITED.labels("handshake").inc()
            raise Refused("rate_limited", "too many connection attempts; back off and retry")
        token = auth.get("token") if isinstance(auth, dict) else None
        if token is None:
            token = bearer_token(environ.get("HTTP_AUTHORIZATION"))
        try:
            return await self.verifier.verify(token)
        except AuthError as exc:
            raise Refused(exc.code, exc.message) from None

    def _greet(self, sid: str) -> None:
        conn = self.connections.get(sid)
        self.feeds.send(
            sid,
            "connection_status",
            {
                "status": "connected",
                "sid": sid,
                "node": self.settings.node_id,
                "server_time": iso(utcnow()),
                "protocol": PROTOCOL_VERSION,
                "token_expires_at": _iso_epoch(conn.principal.expires_at) if conn is not None else None,
            },
        )
        if conn is not None:
            self._warn_if_due(sid, conn, time.time())

    async def disconnect(self, sid: str, reason: Any = None) -> None:
        conn = self.connections.pop(sid, None)
        if conn is None:
            return
        self._token_checks.forget(sid)
        self.feeds.detach(sid)
        self.presence.detach(sid)
        metrics.DISCONNECTS.labels(_reason_label(reason)).inc()
        metrics.CONNECTED_CLIENTS.labels(conn.transport).dec()

    async def expire_forever(self) -> None:
        """Drop connections whose token has expired, checked once a second. Each connection's next
        look (its warning, then its expiry) is a deadline in a heap: the pass costs what falls due,
        not a visit to every connection (7% of an idle node's samples at 15,000 clients, growing
        with them: docs/perf/README.md), and no connection has a timer of its own."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK_SECONDS)
            self.expire_due(time.time())

    def expire_due(self, now: float) -> None:
        """The same pass warns of tokens about to expire (token_expiring, once per token)."""
        limit = now - self.settings.token_check_leeway_seconds
        warn_before = now + self.settings.token_refresh_warning_seconds
        for sid in self._token_checks.pop_due(now):
            conn = self.connections.get(sid)
            if conn is None or conn.expired:
                continue
            expires_at = conn.principal.expires_at
            if expires_at <= limit:
                conn.expired = True
                self._expire(sid)
                continue
            if not conn.warned and expires_at <= warn_before:
                self._warn_if_due(sid, conn, now)
            self._schedule_token_check(sid, conn)

    def _schedule_token_check(self, sid: str, conn: Connection) -> None:
        expires_at = conn.principal.expires_at
        expiry = expires_at + self.settings.token_check_leeway_seconds
        if not conn.warned:
            expiry = min(expiry, expires_at - self.settings.token_refresh_warning_seconds)
        self._token_checks.set(sid, expiry)

    def _warn_if_due(self, sid: str, conn: Connection, now: float) -> None:
        expires_at = conn.principal.expires_at
        if conn.warned or expires_at - now > self.settings.token_refresh_warning_seconds:
            return
        conn.warned = True
        left = max(0, math.ceil(expires_at - now))
        if self.feeds.send(sid, "token_expiring", {"expires_at": _iso_epoch(expires_at), "in_seconds": left}):
            metrics.TOKEN_EXPIRING_SENT.inc()

    def _expire(self, sid: str) -> None:
        metrics.TOKEN_EXPIRIES.inc()
        self._spawn(self.drop(sid, disconnects.AUTH_EXPIRED))

    def drop_slow_consumer(self, sid: str) -> None:
        metrics.SLOW_CONSUMERS.inc()
        self._spawn(self.drop(sid, disconnects.SLOW_CONSUMER))

    async def drop(self, sid: str, reason: DisconnectReason) -> Any:
        """End a connection as PROTOCOL.md 1.1 says for `reason`: the `error` event first, then a
        Socket.IO DISCONNECT only where the client must not come back by itself, then the
        Engine.IO close. Nothing here waits on the client for long: a long-polling client between
        polls is given POLL_HANDOVER_SECONDS to come for its error, and nothing else is waited for.
        Returns the Engine.IO socket (None when the connection was already gone), so a drain can
        see its queue empty."""
        if sid not in self.connections:
            return None
        self.feeds.detach(sid)
        self.presence.detach(sid)
        metrics.SERVER_DISCONNECTS.labels(reason.label).inc()
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if socket is not None and not reason.sends_disconnect_packet:
            # The client comes back and rejoins with last_seq, so its backlog is replayed then. Without
            # it the error reaches the client now: not after thousands of packets a slow consumer is
            # not taking, and not behind a backlog a long-poll (16 packets a GET) would never finish.
            socket.queue.discard()
        # Queued straight on the socket, with no suspension before the close below: a long-poll
        # that is held now must leave with the error and the CLOSE packet together.
        self.feeds.send(sid, "error", reason.error_event())
        if reason.sends_disconnect_packet:
            await self.sio.disconnect(sid)
        if socket is not None and not socket.upgraded and not socket.queue.consumer_waiting():
            # Between two polls: once closed, its next GET would be refused before it could take
            # the error. Hold the session open until that GET has taken what is queued, briefly.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_HANDOVER_SECONDS):
                    await socket.queue.join()
        if socket is not None:
            # python-socketio's disconnect only leaves the namespace: a client that ignored that
            # would keep its connection, and its slot on this node, for as long as it answers PINGs.
            # For `auto` not even Engine.IO's CLOSE packet: python-engineio's client takes it as a
            # close it asked for and does not reconnect; a transport that just ends (the WebSocket
            # closed, the next long-poll answered 400) every client library reconnects from.
            await socket.close(
                wait=False, abort=not reason.sends_disconnect_packet, reason=self.sio.eio.reason.SERVER_DISCONNECT
            )
        return socket

    async def disconnect_all(self, reason: DisconnectReason) -> list[Any]:
        """End every connection of this node for `reason` (draining); returns their sockets."""
        sockets = await asyncio.gather(*(self.drop(sid, reason) for sid in list(self.connections)))
        return [s for s in sockets if s is not None]

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- event plumbing ----------------------------------------------------------------------

    def _wrap(self, event: str, handler: Handler) -> Callable[..., Awaitable[dict[str, Any] | None]]:
        received_ok = metrics.EVENTS_RECEIVED.labels(event, "ok")
        latency = metrics.HANDLER_SECONDS.labels(event)

        async def on_event(sid: str, *args: Any) -> dict[str, Any] | None:
            started = time.perf_counter()
            wants_ack = _wants_ack.get()
            try:
                conn = self._admit_event(sid)
                # Handlers reach their first real await (the store queue) without yielding, so
                # events from one client are queued for the store in the order they were sent.
                answer = await handler(sid, conn, args[0] if args else None)
                received_ok.inc()
                return {"ok": True, **answer} if wants_ack else None
            except ProtocolError as exc:
                metrics.EVENTS_RECEIVED.labels(event, exc.code.value).inc()
                return await self._fail(sid, event, exc, wants_ack)
            except Exception:
                log.exception("handler %s failed", event)
                metrics.EVENTS_RECEIVED.labels(event, ErrorCode.INTERNAL.value).inc()
                return await self._fail(sid, event, ProtocolError(ErrorCode.INTERNAL, "internal error"), wants_ack)
            finally:
                latency.observe(time.perf_counter() - started)

        return on_event

    def _admit_event(self, sid: str) -> Connection:
        """The gate every client event passes first, known or not: a live connection, a token
        that has not expired, and room in the connection's token bucket."""
        conn = self.connections.get(sid)
        if conn is None:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "connection is closing")
        if conn.principal.expires_at + self.settings.token_check_leeway_seconds < time.time():
            if not conn.expired:
                conn.expired = True
                self._expire(sid)
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "token has expired")
        if not conn.bucket.take():
            metrics.RATE_LIMITED.labels("event").inc()
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many events; slow down")
        return conn

    async def _fail(self, sid: str, event: str, exc: ProtocolError, wants_ack: bool) -> dict[str, Any] | None:
        if wants_ack:
            return {"ok": False, "error": exc.as_dict()}
        await self.sio.emit("error", {**exc.as_dict(), "event": event}, to=sid)
        metrics.EVENTS_EMITTED.labels("error").inc()
        return None

    async def unknown_event(self, event: Any, sid: str, *args: Any) -> dict[str, Any] | None:
        name = str(event)[:64]
        try:
            self._admit_event(sid)
            exc = ProtocolError(ErrorCode.BAD_REQUEST, f"event: unknown event {name!r}")
        except ProtocolError as refused:
            exc = refused
        metrics.EVENTS_RECEIVED.labels("unknown", exc.code.value).inc()
        return await self._fail(sid, name, exc, _wants_ack.get())

    # ---- events ------------------------------------------------------------------------------

    async def join_session(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        req = JoinRequest.parse(payload)
        conn.principal.require(Action.WATCH, req.session_id)
        # Subscribe first, read second: whatever commits after the read is published after the
        # subscription is confirmed, so it reaches this node; whatever committed before is replayed.
        room = session_room(req.session_id)
        turn = self.feeds.claim_join(sid, req.session_id)
        try:
            await self.sio.enter_room(sid, room)
            session = await self.hub.get(conn.principal, req.session_id)
            replayed = await self.feeds.join(sid, session, req.last_seq, req.batch_ms, req.status_since, turn=turn)
        except ProtocolError:
            # A join asked again meanwhile still needs the room (and this node's subscription).
            superseded = self.feeds.superseded(sid, req.session_id, turn)
            if not superseded and req.session_id not in self.feeds.sessions_of(sid):
                await self.sio.leave_room(sid, room)
            raise
        finally:
            self.feeds.release_join(sid, req.session_id, turn)
        # After the awaits: the connection may have gone meanwhile, and must not be seated then.
        if sid in self.connections:
            principal = conn.principal
            self.presence.join(sid, req.session_id, principal.sub, principal.role.value, req.presence)
        return {"session": session.view(), "replayed": replayed}

    async def leave_session(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        req = SessionRef.parse(payload)
        self.feeds.leave(sid, req.session_id)
        self.presence.leave(sid, req.session_id)
        await self.sio.leave_room(sid, session_room(req.session_id))
        return {}

    async def start_session(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        req = StartRequest.parse(payload)
        session = await self.hub.start(conn.principal, req)
        await self.sio.enter_room(sid, session_room(session.id))
        turn = self.feeds.claim_join(sid, session.id)
        try:
            await self.feeds.join(sid, session, None, turn=turn)
        finally:
            self.feeds.release_join(sid, session.id, turn)
        # A detector may have published between the start and this node's subscription.
        self.feeds.resync(session.id)
        if sid in self.connections:
            self.presence.join(sid, session.id, conn.principal.sub, conn.principal.role.value, False)
        return {"session": session.view()}

    def _control(self, verb: Verb) -> Handler:
        async def change(sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
            req = SessionRef.parse(payload)
            session = await self.hub.transition(conn.principal, req.session_id, verb)
            return {"session": session.view()}

        return change

    async def stop_session(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        req = StopRequest.parse(payload)
        session = await self.hub.transition(conn.principal, req.session_id, Verb.STOP, req.reason)
        return {"session": session.view()}

    async def publish_detection(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        conn.principal.require(Action.PUBLISH)
        stored = await self.hub.publish(conn.principal, PublishRequest.parse_one(payload))
        return publish_ack(stored)

    async def publish_detections(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        conn.principal.require(Action.PUBLISH)
        stored = await self.hub.publish(conn.principal, PublishRequest.parse_batch(payload))
        return batch_ack(stored)

    async def get_presence(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        req = SessionRef.parse(payload)
        conn.principal.require(Action.WATCH, req.session_id)
        await self.hub.get(conn.principal, req.session_id)  # not_found as join_session would say
        return {"presence": await self.presence.answer(req.session_id)}

    async def refresh_token(self, sid: str, conn: Connection, payload: Any) -> dict[str, Any]:
        """PROTOCOL.md 1.1 token refresh. Nothing awaits between the check that the connection has
        not expired (after verification, which may fetch a JWK Set) and the new principal being in
        place, so the once-a-second expiry pass sees either the old token or the new one, never a
        mix; a failure changes nothing."""
        try:
            principal = await self._refreshed(conn, payload)
        except ProtocolError as exc:
            metrics.TOKEN_REFRESHES.labels(exc.code.value).inc()
            raise
        conn.principal = principal
        conn.warned = False
        self._schedule_token_check(sid, conn)
        self.presence.change_role(sid, principal.role.value)
        for session_id in sorted(self.feeds.sessions_of(sid)):
            if principal.may_touch(session_id):
                continue
            self.feeds.leave(sid, session_id)
            self.presence.leave(sid, session_id)
            self._spawn(self.sio.leave_room(sid, session_room(session_id)))
            error = ProtocolError(ErrorCode.FORBIDDEN, f"the refreshed token may not see session '{session_id}'")
            self.feeds.send(sid, "error", {**error.as_dict(), "event": "refresh_token", "session_id": session_id})
        metrics.TOKEN_REFRESHES.labels("ok").inc()
        self._warn_if_due(sid, conn, time.time())
        return {"expires_at": _iso_epoch(principal.expires_at)}

    async def _refreshed(self, conn: Connection, payload: Any) -> Principal:
        req = RefreshRequest.parse(payload)
        try:
            principal = await self.verifier.verify(req.token)
        except AuthError as exc:
            codes = {"auth_expired": ErrorCode.AUTH_EXPIRED, "unavailable": ErrorCode.UNAVAILABLE}
            raise ProtocolError(codes.get(exc.code, ErrorCode.AUTH_INVALID), exc.message) from None
        if principal.sub != conn.principal.sub:
            raise ProtocolError(ErrorCode.FORBIDDEN, "the new token is for another sub than this connection's")
        if conn.expired:
            # The expiry pass got here first: the connection is already being closed.
            raise ProtocolError(ErrorCode.AUTH_EXPIRED, "this connection's token has expired")
        return principal


def _iso_epoch(seconds: float) -> str:
    return iso(datetime.fromtimestamp(seconds, UTC))


def _reason_label(reason: Any) -> str:
    text = str(reason or "").lower().replace(" ", "_")
    return text if text in metrics.DISCONNECT_REASONS else "other"
