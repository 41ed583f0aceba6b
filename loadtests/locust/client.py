"""One testpulse Socket.IO connection as Locust sees it: timed connect and acks, refusals, drops.

Built on `locust.contrib.socketio`: its SocketIOClient is python-socketio's synchronous Client
(websocket-client for WebSocket, requests for long-polling) run under gevent, with Locust's request
event at hand. What it records is not what we need, so the measured parts are replaced here:
- connect is timed up to the CONNECT of the namespace and reported as ("sio", "connect"); a refusal
  carries the contract's connect_error code (or the proxy's HTTP status) and is counted per code;
- every event is sent with an ack and reported as ("sio", <event>) with the ack's round trip; an
  ack with ok=false is a failure naming its error code;
- waiting for an ack ends when the connection drops (python-socketio's `call` would wait for its
  whole timeout), so a lost node shows up as a drop, not as a slow ack.
Delivery checks (seq order, latency) live with the users, which outlive any one connection.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import socketio
from gevent.event import AsyncResult, Event
from locust.contrib.socketio import SocketIOClient
from locust.event import EventHook
from socketio import packet as sio_packet

# Request types shown in Locust's tables, CSV and HTML report.
SIO = "sio"  # connect, connect+join and every acknowledged event
DELIVERY = "delivery"  # detection_event latency (now - ts), seq gaps and duplicates, tail checks
NODE = "node"  # one sample per connection, named after the node that took it (connection_status.node)
RECOVER = "recover"  # drop noticed -> reconnected and rejoined (time-to-recover)

ACK_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
STATUS_CODE = re.compile(r"\b([1-5]\d\d)\b")


class Counters(Protocol):
    def add(self, key: str, amount: int = 1) -> None: ...


class Refused(Exception):
    """The handshake or the CONNECT was refused; `code` is the contract's code or `http_<status>`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"refused ({code}): {message}")
        self.code = code


class AckError(Exception):
    """An event was answered with ok=false."""

    def __init__(self, event: str, code: str, message: str) -> None:
        super().__init__(f"{event}: {code}: {message}")
        self.code = code


class AckTimeout(Exception):
    pass


class Dropped(Exception):
    """The connection ended while we waited for an answer."""


class DeliveryError(Exception):
    pass


@dataclass
class Recorder:
    """Where users and clients report: Locust's request event plus the run's counters.

    `fault_injected` tells whether the run has broken something on purpose (a mass disconnect, a
    killed node); an event interrupted by a drop is then expected and counted as `interrupted`
    instead of failing."""

    request_event: EventHook
    counters: Counters
    fault_injected: Callable[[], bool]

    def request(self, kind: str, name: str, ms: float, error: Exception | None = None, length: int = 0) -> None:
        self.request_event.fire(
            request_type=kind, name=name, response_time=ms, response_length=length, exception=error, context={}
        )

    def count(self, key: str, amount: int = 1) -> None:
        self.counters.add(key, amount)

    def interrupted(self, event: str, ms: float, error: Exception) -> None:
        if self.fault_injected():
            self.count("interrupted")
            self.count(f"interrupted:{event}")
        else:
            self.request(SIO, event, ms, error)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


class TestpulseClient(SocketIOClient):
    """One connection. Not reused after it drops: users open a new one, as a browser tab would."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        on_detection: Callable[[dict[str, Any]], None] | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(recorder.request_event, **options)
        self.recorder = recorder
        self.node: str | None = None
        self.transport_name = "websocket"
        self.status: AsyncResult = AsyncResult()
        self.dropped = Event()
        self.dropped_at = 0.0
        self.closing = False
        self._pending: set[AsyncResult] = set()
        self._refusal: Any = None
        self.on_detection = on_detection
        self.on_update = on_update
        self.on("connection_status", self._status)
        self.on("detection_event", self._detection)
        self.on("test_session_update", self._update)
        self.on("error", self._error)
        self.on("connect_error", self._connect_error)
        self.on("disconnect", self._disconnect)

    # ---- connecting --------------------------------------------------------------------------

    def open(self, url: str, token: str, transports: list[str] | None, timeout: float = CONNECT_TIMEOUT) -> str:
        """Connect, wait for connection_status, return the node that took us. Raises Refused."""
        self.transport_name = "upgrade" if transports is None else transports[0]
        started = time.perf_counter()
        try:
            socketio.Client.connect(self, url, auth={"token": token}, transports=transports, wait_timeout=timeout)
        except socketio.exceptions.ConnectionError as exc:
            refused = Refused(self._refusal_code(exc), str(exc))
            self.recorder.request(SIO, "connect", _ms(started), refused)
            self.recorder.count(f"refused:{refused.code}")
            raise refused from None
        self.recorder.request(SIO, "connect", _ms(started))
        try:
            status = self.status.get(timeout=timeout)
        except gevent.Timeout:
            error = Refused("no_status", f"no connection_status within {timeout:.0f}s")
            self.recorder.request(SIO, "connection_status", _ms(started), error)
            self.close()
            raise error from None
        self.node = str(status.get("node"))
        self.recorder.request(NODE, self.node, _ms(started))
        self.recorder.count(f"node_connects:{self.node}")
        self.recorder.count(f"node_open:{self.node}")
        self.recorder.count(f"transport:{self.transport_name}")
        return self.node

    def _refusal_code(self, exc: Exception) -> str:
        data = self._refusal
        if isinstance(data, dict) and isinstance(data.get("code"), str):
            return str(data["code"])
        text = f"{exc} {data or ''}"
        status = STATUS_CODE.search(text)
        if status:
            return f"http_{status.group(1)}"
        return "connection_error"

    # ---- events ------------------------------------------------------------------------------

    def call(self, event: str, data: Any = None, namespace: str | None = None, timeout: float = ACK_TIMEOUT) -> Any:
        """Send `event` with an ack; return the ack (ok=true). Raises AckError, AckTimeout, Dropped."""
        started = time.perf_counter()
        if self.dropped.is_set():
            raise Dropped(f"{event}: not connected")
        answer: AsyncResult = AsyncResult()
        self._pending.add(answer)
        try:
            socketio.Client.emit(
                self, event, data, namespace=namespace, callback=lambda *args: answer.set(args[0] if args else None)
            )
            ack = answer.get(timeout=timeout)
        except gevent.Timeout:
            error = AckTimeout(f"{event}: no ack within {timeout:.0f}s")
            self.recorder.request(SIO, event, _ms(started), error)
            raise error from None
        except (Dropped, socketio.exceptions.SocketIOError) as exc:
            dropped = exc if isinstance(exc, Dropped) else Dropped(f"{event}: {exc}")
            self.recorder.interrupted(event, _ms(started), dropped)
            raise dropped from None
        finally:
            self._pending.discard(answer)
        elapsed = _ms(started)
        if not isinstance(ack, dict) or ack.get("ok") is not True:
            detail = ack.get("error") if isinstance(ack, dict) else None
            detail = detail if isinstance(detail, dict) else {}
            error = AckError(event, str(detail.get("code", "bad_ack")), str(detail.get("message", ack))[:200])
            self.recorder.request(SIO, event, elapsed, error)
            raise error
        self.recorder.request(SIO, event, elapsed)
        return ack

    def emit(self, event: str, data: Any = None, namespace: str | None = None, callback: Any = None) -> None:
        """Unrecorded emit; every event we send goes through `call` and is recorded there."""
        socketio.Client.emit(self, event, data, namespace=namespace, callback=callback)

    def _status(self, data: Any) -> None:
        if isinstance(data, dict) and not self.status.ready():
            self.status.set(data)

    def _detection(self, data: Any) -> None:
        if self.on_detection is not None and isinstance(data, dict):
            self.on_detection(data)

    def _update(self, data: Any) -> None:
        if self.on_update is not None and isinstance(data, dict):
            self.on_update(data)

    def _error(self, data: Any) -> None:
        code = data.get("code", "unknown") if isinstance(data, dict) else "unknown"
        self.recorder.request(SIO, f"error event {code}", 0, DeliveryError(str(data)[:200]))
        self.recorder.count(f"error_event:{code}")

    def _connect_error(self, data: Any = None) -> None:
        self._refusal = data

    def _disconnect(self, reason: Any = None) -> None:
        if self.dropped.is_set():
            return
        self.dropped_at = time.perf_counter()
        self.dropped.set()
        if self.node is not None:
            self.recorder.count(f"node_open:{self.node}", -1)
        for waiting in list(self._pending):
            waiting.set_exception(Dropped(f"connection lost ({reason})"))

    # ---- leaving -----------------------------------------------------------------------------

    def disconnect(self) -> None:
        """python-socketio's disconnect without waiting for the read loop: over long-polling the held
        GET only ends at the server's next ping (~30 s; python-engineio does the same against a
        stock server), and `connect` calls this on a refusal, so a refused polling client would
        take 30 s to learn it. Socket.IO DISCONNECT and Engine.IO CLOSE are still sent."""
        for namespace in list(self.namespaces):
            self._send_packet(self.packet_class(sio_packet.DISCONNECT, namespace=namespace))
        self.eio.disconnect(abort=True)

    def close(self) -> None:
        """Leave politely (DISCONNECT, CLOSE) and do not look back."""
        self.closing = True
        with contextlib.suppress(Exception):
            self.disconnect()

    def drop(self) -> None:
        """Vanish the way a network failure does: the WebSocket's TCP connection is shut without a
        close frame; a long-polling client just stops (Engine.IO CLOSE, no Socket.IO DISCONNECT)."""
        ws = getattr(self.eio, "ws", None)
        if self.eio.current_transport == "websocket" and ws is not None and ws.sock is not None:
            with contextlib.suppress(OSError):
                ws.sock.shutdown(socket.SHUT_RDWR)
            return
        with contextlib.suppress(Exception):
            self.eio.disconnect(abort=True)
