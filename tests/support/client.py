"""A real python-socketio client that records every server event and waits on conditions with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import socketio

# The contract's transports as users pick them: websocket only, polling only, polling then upgrade.
TRANSPORTS: dict[str, list[str] | None] = {
    "websocket": ["websocket"],
    "polling": ["polling"],
    "upgrade": None,
}

SERVER_EVENTS = ("connection_status", "test_session_update", "detection_event", "error")


class Client:
    """One Socket.IO connection. Every received event lands in `events` in arrival order.

    Handlers are synchronous on purpose: python-socketio runs each incoming packet in its own task,
    and a handler without an await records packets in the order the server sent them.
    """

    def __init__(self, name: str = "client") -> None:
        self.name = name
        self.sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
        self.events: list[tuple[str, Any]] = []
        self.arrived: list[float] = []  # time.monotonic() of each of `events`
        self.connect_errors: list[Any] = []
        self.disconnects: list[Any] = []
        self._changed = asyncio.Event()
        for event in SERVER_EVENTS:
            self.sio.on(event, self._recorder(event))
        self.sio.on("*", self._record_other)
        self.sio.on("connect_error", self._record_connect_error)
        self.sio.on("disconnect", self._record_disconnect)

    # ---- recording ---------------------------------------------------------------------------

    def _recorder(self, event: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.events.append((event, args[0] if len(args) == 1 else list(args)))
            self.arrived.append(time.monotonic())
            self._changed.set()

        return record

    def _record_other(self, event: str, *args: Any) -> None:
        self.events.append((event, args[0] if len(args) == 1 else list(args)))
        self.arrived.append(time.monotonic())
        self._changed.set()

    def _record_connect_error(self, data: Any = None) -> None:
        self.connect_errors.append(data)
        self._changed.set()

    def _record_disconnect(self, reason: Any = None) -> None:
        self.disconnects.append(reason)
        self._changed.set()

    # ---- connecting --------------------------------------------------------------------------

    async def connect(
        self,
        url: str,
        *,
        token: str | None = None,
        auth: Any = None,
        headers: dict[str, str] | None = None,
        transport: str = "websocket",
        wait_timeout: float = 10.0,
    ) -> Client:
        """Connect with `auth={'token': token}` (or the raw `auth` given); raises socketio's ConnectionError."""
        if auth is None and token is not None:
            auth = {"token": token}
        connecting = asyncio.ensure_future(
            self.sio.connect(
                url,
                auth=auth,
                headers=headers or {},
                transports=TRANSPORTS[transport],
                wait_timeout=wait_timeout,
            )
        )
        while not connecting.done():
            await asyncio.wait({connecting}, timeout=0.5)
            if not connecting.done() and self.connect_errors:
                # Refused: the client is closing its Engine.IO session, which over polling waits
                # for the server's pending long-poll (see disconnect()); cut it short.
                await self._close_http()
        await connecting
        return self

    async def _close_http(self) -> None:
        http = self.sio.eio.http
        if http is not None and not http.closed:
            await http.close()

    async def disconnect(self) -> None:
        if self.sio.connected:
            closing = asyncio.ensure_future(self.sio.disconnect())
            done, _ = await asyncio.wait({closing}, timeout=0.5)
            if not done:
                # python-engineio's server leaves a pending long-poll GET unanswered after the
                # client's CLOSE until its ping deadline (~45 s); closing our HTTP session ends it now.
                await self._close_http()
            await closing
        await self.sio.shutdown()

    @property
    def connected(self) -> bool:
        return bool(self.sio.connected)

    # ---- sending -----------------------------------------------------------------------------

    async def call(self, event: str, payload: Any = None, *, deadline: float = 15.0) -> Any:
        """Emit with an ack callback and return the ack. Pass `(None,)` to send an explicit JSON null."""
        return await self.sio.call(event, payload, timeout=deadline)

    async def ok(self, event: str, payload: Any = None, *, deadline: float = 15.0) -> dict[str, Any]:
        """The success ack of `event`; fails the test with the server's error otherwise."""
        ack = await self.call(event, payload, deadline=deadline)
        assert isinstance(ack, dict) and ack.get("ok") is True, f"{event} {payload!r} was refused: {ack!r}"
        return ack

    async def refused(self, event: str, payload: Any = None, *, deadline: float = 15.0) -> dict[str, Any]:
        """The `error` object of a failure ack, checked against the contract's shape."""
        ack = await self.call(event, payload, deadline=deadline)
        assert isinstance(ack, dict) and ack.get("ok") is False, f"{event} {payload!r} was accepted: {ack!r}"
        error = ack["error"]
        assert set(error) == {"code", "message"}, error
        assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
        return dict(error)

    async def start_session(self, **fields: Any) -> dict[str, Any]:
        """start_test_session (a new session unless `session_id` is given); returns the session object."""
        return dict((await self.ok("start_test_session", fields))["session"])

    async def join(self, session_id: str, last_seq: int | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"session_id": session_id}
        if last_seq is not None:
            payload["last_seq"] = last_seq
        return await self.ok("join_session", payload)

    async def publish(self, session_id: str, i: int = 0, **fields: Any) -> int:
        """publish_detection of `detection(i, **fields)`; returns its seq."""
        ack = await self.ok("publish_detection", {"session_id": session_id, **detection(i, **fields)})
        return int(ack["seq"])

    async def emit(self, event: str, payload: Any = None) -> None:
        """Emit without an ack callback (failures then arrive as `error` events)."""
        await self.sio.emit(event, payload)

    # ---- reading -----------------------------------------------------------------------------

    def received(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    def received_at(self, event: str) -> list[tuple[float, Any]]:
        """(arrival time, payload) of each `event`, in arrival order."""
        return [(at, data) for at, (name, data) in zip(self.arrived, self.events, strict=True) if name == event]

    def presence(self, session_id: str) -> list[dict[str, Any]]:
        """The `presence_update`s of one session, in arrival order."""
        return [u for u in self.received("presence_update") if u.get("session_id") == session_id]

    def detections(self, session_id: str) -> list[dict[str, Any]]:
        return [d for d in self.received("detection_event") if d.get("session_id") == session_id]

    def seqs(self, session_id: str) -> list[int]:
        return [d["seq"] for d in self.detections(session_id)]

    def updates(self, session_id: str) -> list[dict[str, Any]]:
        return [u for u in self.received("test_session_update") if u.get("session_id") == session_id]

    def errors(self) -> list[dict[str, Any]]:
        return self.received("error")

    # ---- waiting -----------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], Any], *, deadline: float = 10.0, what: str = "condition") -> Any:
        """Wait until `predicate()` is truthy (re-checked on every received event) and return its value."""
        return await wait_on(self._changed, predicate, deadline, lambda: f"{self.name}: {what}; {self.summary()}")

    async def wait_for_event(
        self, event: str, match: Callable[[Any], bool] = lambda _: True, *, deadline: float = 10.0
    ) -> Any:
        """The first received `event` whose payload satisfies `match`."""

        def found() -> Any:
            return next((d for d in self.received(event) if match(d)), None)

        return await self.wait_for(found, deadline=deadline, what=f"event {event!r} matching")

    async def wait_for_seqs(self, session_id: str, count: int, *, deadline: float = 15.0) -> list[int]:
        """Wait until `count` detections of the session arrived; returns their seqs in arrival order."""
        await self.wait_for(
            lambda: len(self.seqs(session_id)) >= count, deadline=deadline, what=f"{count} detections of {session_id}"
        )
        return self.seqs(session_id)

    async def wait_disconnected(self, *, deadline: float = 10.0) -> None:
        await self.wait_for(lambda: self.disconnects or not self.sio.connected, deadline=deadline, what="disconnect")

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for name, _ in self.events:
            counts[name] = counts.get(name, 0) + 1
        return f"received {counts}, connect_errors={self.connect_errors!r}, disconnects={self.disconnects!r}"


def detection(i: int = 0, **fields: Any) -> dict[str, Any]:
    """A valid detection payload (without session_id); `fields` override or add to it."""
    body: dict[str, Any] = {
        "label": f"object-{i}",
        "confidence": 0.5,
        "bbox": [1.0, 2.0, 30.0, 40.0],
        "frame": i,
        "ts": 1_700_000_000_000 + i,
        "attributes": {"i": i},
    }
    body.update(fields)
    return body


async def wait_on(
    changed: asyncio.Event, predicate: Callable[[], Any], deadline: float, failure: Callable[[], str]
) -> Any:
    """Re-check `predicate` whenever `changed` is set (and at least every 0.25 s, for predicates
    that depend on something else, e.g. time) until it is truthy; return its value."""
    give_up = time.monotonic() + deadline
    while True:
        changed.clear()
        value = predicate()
        if value:
            return value
        remaining = give_up - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"not seen within {deadline:.1f}s: {failure()}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), min(remaining, 0.25))
