"""The Engine.IO layer of a node: python-engineio's server with sockets that cost less per client.

python-engineio gives every WebSocket client a reader that starts a task and a timer per received
packet, a writer that arms a timer per wake-up, a task that sleeps until the next PING, and an
asyncio.Queue (four deques). On an idle node that is most of a client's memory, and on a busy one
a good share of its CPU. Here:
  - the reader awaits the WebSocket directly; a silent client is closed by the Pinger below;
  - what is queued for a WebSocket is written at the end of the loop turn by one Flusher per node
    (server/transport/wsprotocol.py's WRITE_NOW: no suspension, every queued packet in one write, each
    packet's frame built once for all its viewers); a writer task runs only while there is more
    to do than that (flow control, with the write deadline, and the end of the stream), so an
    idle client has none, and a busy one has none to wake up per packet;
  - without WRITE_NOW, the writer waits on the queue without a timer (the queue's None ends it),
    and hands what it finds queued to the server in one write where the server allows;
  - one Pinger task per node sends every socket's PING when it falls due and closes the socket
    whose PONG is late (two FIFOs, no timers); the service task only forgets closed sockets;
  - the queue is a deque allocated only while it holds packets.
The wire protocol is unchanged (Engine.IO v4), long-polling included.

This is the lean transport (TESTPULSE_TRANSPORT=lean, or auto): it overrides python-engineio
internals, which server/transport/internals.py lists and server/transport/auto.py checks before choosing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import engineio
from engineio import packet

from testpulse import metrics
from testpulse.transport.extensions import ABORT, SEND_BATCH, WRITE_NOW
from testpulse.transport.queue import POLL_PACKETS_MAX
from testpulse.transport.stock import TaggedEngineServer
from testpulse.transport.wiremessage import WireMessage, wire_message

log = logging.getLogger("testpulse.transport.lean")

WRITE_PACKETS_MAX = 1024  # per WebSocket writer wake-up; the rest waits for the next one
# The Pinger's slot: a PING leaves up to this much after its time, a silent socket is closed up to
# this much after its deadline. Against a 25 s interval, nothing; one wake-up per socket instead was
# three quarters of an idle node's CPU (docs/perf/README.md, the idle profiles).
PING_TICK_SECONDS = 0.05
_PING = packet.Packet(packet.PING)


class PacketQueue:
    """The subset of asyncio.Queue that Engine.IO sockets and the delivery feeds use, for one
    consumer at a time (a socket's writer, or its one pending long-poll).

    None is the end-of-stream mark, not a packet: join() does not wait for it to be taken (a
    writer that has ended leaves the marks put after its own), and consumers call task_done()
    for packets only."""

    __slots__ = ("_getter", "_idle", "_items", "_unfinished", "on_put", "taken")

    def __init__(self) -> None:
        self.taken = 0  # packets handed to the consumer so far: tells a stalled reader from a slow one
        # Set by a consumer that takes what is queued as it comes (NodeSocket's direct writes):
        # a put, of a packet or of the end mark, then calls it instead of waking a waiting get().
        self.on_put: Callable[[], None] | None = None
        self._items: deque[Any] | None = None
        self._getter: asyncio.Future[None] | None = None
        self._unfinished = 0
        self._idle: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def consumer_waiting(self) -> bool:
        return self._getter is not None and not self._getter.done()

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        if item is not None:
            self._unfinished += 1
        if self.on_put is not None:
            self.on_put()
        else:
            self.wake()

    def wake(self) -> None:
        """Resume a get() waiting for a packet (it takes what is queued, if anything)."""
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        self.taken += 1
        if not self._items:
            self._items = None
        return item

    def take(self, limit: int) -> list[Any]:
        """Up to `limit` queued packets at once (each counted as taken and done), stopping before an
        end mark, which stays queued for get()."""
        items = self._items
        if items is not None and len(items) == 1 and items[0] is not None:  # the common case
            self._items = None
            self.taken += 1
            self.task_done()
            return [items[0]]
        taken: list[Any] = []
        while items and len(taken) < limit and items[0] is not None:
            taken.append(items.popleft())
        if not items:
            self._items = None
        if taken:
            self.taken += len(taken)
            self._unfinished -= len(taken) - 1
            self.task_done()
        return taken

    def unget(self, items: list[Any]) -> None:
        """Put packets that take() returned back at the front, as if never taken."""
        if not items:
            return
        if self._items is None:
            self._items = deque()
        self._items.extendleft(reversed(items))
        self.taken -= len(items)
        self._unfinished += len(items)

    async def get(self) -> Any:
        while not self._items:
            if self._getter is not None and not self._getter.done():
                raise RuntimeError("PacketQueue has one consumer at a time")
            getter = asyncio.get_running_loop().create_future()
            self._getter = getter
            try:
                await getter
            finally:
                if self._getter is getter:
                    self._getter = None
        return self.get_nowait()

    def discard(self) -> int:
        """Drop every queued packet (a dropped slow consumer's backlog: it replays on rejoin)."""
        dropped = sum(1 for item in self._items or () if item is not None)
        self._items = None
        for _ in range(dropped):
            self.task_done()
        return dropped

    def task_done(self) -> None:
        self._unfinished -= 1
        if self._unfinished <= 0 and self._idle is not None:
            idle, self._idle = self._idle, None
            if not idle.done():
                idle.set_result(None)

    async def join(self) -> None:
        if self._unfinished > 0:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)


class NodeSocket(engineio.async_socket.AsyncSocket):  # type: ignore[misc]
    """Engine.IO socket with the lean reader, writer and PING schedule described above."""

    # Set by engineio's BaseSocket; declared for the type checker (engineio is untyped).
    server: Any
    sid: str
    queue: PacketQueue
    last_ping: float | None
    connected: bool
    upgraded: bool
    upgrading: bool
    closed: bool
    closing: bool
    batch_writes = False  # the server takes SEND_BATCH (several WebSocket messages in one write)
    # The protocol's write_now (WRITE_NOW): packets are then written by the node's Flusher as they
    # come, and the writer task only wakes for what that cannot do (flow control, the end mark).
    write_now: Callable[[list[WireMessage]], bool] | None = None
    flush_due = False
    _ws: Any = None
    # The writer task while one runs; once it has ended the stream it stays, done, so that no
    # other starts.
    _writer: asyncio.Future[None] | None = None

    async def poll(self) -> list[Any]:
        if self.queue.empty():
            if self.upgraded:
                first = await self.queue.get()  # a WebSocket writer waits as long as it takes
            else:
                if self.queue.consumer_waiting():
                    # A second long-poll while one is pending: Engine.IO allows one at a time, and
                    # like the protocol's reference server we end the session (400 for this GET,
                    # CLOSE for the pending one) instead of failing the request with a 500.
                    raise engineio.exceptions.QueueEmpty()
                try:
                    # A long-poll GET is answered empty-handed (closing the socket) when nothing
                    # comes within a PING cycle, as python-engineio does.
                    async with asyncio.timeout(self.server.ping_interval + self.server.ping_timeout):
                        first = await self.queue.get()
                except (TimeoutError, asyncio.CancelledError):
                    raise engineio.exceptions.QueueEmpty() from None
        else:
            first = self.queue.get_nowait()
        if first is None:
            return []
        self.queue.task_done()
        limit = WRITE_PACKETS_MAX if self.upgraded else POLL_PACKETS_MAX
        packets = [first]
        while len(packets) < limit and not self.queue.empty():
            pkt = self.queue.get_nowait()
            if pkt is None:
                self.queue.put_nowait(None)
                break
            self.queue.task_done()
            packets.append(pkt)
        return packets

    async def handle_post_request(self, environ: dict[str, Any]) -> None:
        try:
            await super().handle_post_request(environ)
        except ValueError as exc:  # includes UnicodeDecodeError and binascii.Error
            # A long-polling body that is not an Engine.IO payload ends the session (the next GET
            # gets CLOSE), in one log line; python-engineio would log a traceback and go on.
            log.warning(
                "%s: closing after a malformed polling payload (%s: %s)", self.sid, type(exc).__name__, str(exc)[:120]
            )
            await self.close(wait=False, reason=self.server.reason.TRANSPORT_ERROR)
        except (engineio.exceptions.UnknownPacketError, IndexError):
            # A packet a client may not send (OPEN, PING, NOOP; IndexError: a type past 6, which
            # python-engineio's log line indexes). python-engineio would answer 400 only after a
            # close(wait=True), which holds this POST until a GET takes the CLOSE packet: with no
            # GET in flight, forever. Close without waiting; the server's disconnect is then a no-op.
            log.warning("%s: closing after a polling packet a client may not send", self.sid)
            await self.close(wait=False, reason=self.server.reason.TRANSPORT_ERROR)
            raise engineio.exceptions.UnknownPacketError() from None

    async def send(self, pkt: Any) -> None:
        # python-engineio's, without building an info-log line's arguments for every packet.
        if await self.check_ping_timeout():
            self.queue.put_nowait(pkt)

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        was_open = not (self.closed or self.closing)
        await super().close(wait=wait, abort=abort, reason=reason)
        if was_open:
            # The end-of-stream mark, after whatever is queued (the CLOSE packet, if any). It ends
            # the WebSocket writer, and with it the WebSocket (the reader has no timer of its own
            # to notice a mute peer). A long-poll GET held by a client that has just left (it sent
            # Engine.IO's CLOSE) is answered at once instead of at the end of its PING cycle: the
            # held request, and the socket under it, are freed now.
            self.queue.put_nowait(None)

    def schedule_ping(self) -> None:
        # As python-engineio: only after the previous PING was answered (last_ping is set then).
        if self.last_ping:
            self.last_ping = None
            self.server.pinger.schedule(self.sid, self.server.ping_interval)

    async def _websocket_handler(self, ws: Any) -> None:
        if self.connected:
            if not await self._finish_upgrade(ws):
                return
        else:
            self.connected = True
        self.upgraded = True
        if self.batch_writes and not self.queue.empty():
            # The OPEN packet (and whatever else is queued) leaves with the 101 response.
            packets = await self.poll()
            if packets:
                await self._write(ws, packets)
            else:
                self.queue.put_nowait(None)  # poll() took the end-of-stream mark: the writer needs it
        self._ws = ws
        if self.write_now is not None:
            # Direct writes: the Flusher writes what is queued, and a writer task runs only while
            # there is more to do than that (flow control, the end mark): an idle client has none.
            self.queue.on_put = self.flush_soon
            if not self.queue.empty():
                self.flush_soon()
        else:
            self._start_writer()
        try:
            await self._read_forever(ws)
        finally:
            self.queue.put_nowait(None)  # ends the writer once it has sent what is queued
            self.queue.on_put = None
            await (self._writer or self._start_writer())
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)

    def _start_writer(self) -> asyncio.Future[None]:
        self._writer = asyncio.ensure_future(self._write_forever(self._ws))
        return self._writer

    async def _finish_upgrade(self, ws: Any) -> bool:
        """Engine.IO's polling -> WebSocket upgrade: PING "probe", PONG "probe", then UPGRADE."""
        self.upgrading = True  # long-polls answer NOOP from here on
        try:
            probe = packet.Packet(encoded_packet=await self._receive(ws))
            if probe.packet_type != packet.PING or probe.data != "probe":
                return False
            await ws.send(packet.Packet(packet.PONG, data="probe").encode())
            self.queue.put_nowait(packet.Packet(packet.NOOP))  # releases a pending long-poll
            upgrade = packet.Packet(encoded_packet=await self._receive(ws))
            return bool(upgrade.packet_type == packet.UPGRADE)
        except (OSError, ValueError):
            return False
        finally:
            self.upgrading = False

    async def _receive(self, ws: Any) -> Any:
        data = await ws.wait()
        if data and len(data) > self.server.max_http_buffer_size:
            raise ValueError("packet is too large")
        return data

    async def _read_forever(self, ws: Any) -> None:
        while not self.closed:
            try:
                data = await self._receive(ws)
            except (OSError, ValueError):
                return
            if data is None:
                return
            try:
                await self.receive(packet.Packet(encoded_packet=data))
            except engineio.exceptions.UnknownPacketError:
                continue
            except engineio.exceptions.SocketIsClosedError:
                return
            except Exception as exc:  # noqa: BLE001 - Engine.IO or Socket.IO could not parse the packet
                # Handlers run in tasks of their own (and report their own failures), so what
                # surfaces here is a packet the protocol layers could not make sense of: the
                # client's fault. End its connection, in one log line (no traceback to flood logs).
                log.warning(
                    "%s: closing after a malformed packet (%s: %s)", self.sid, type(exc).__name__, str(exc)[:120]
                )
                return

    async def _upgrade_websocket(self, environ: dict[str, Any]) -> Any:
        extensions = environ.get("asgi.scope", {}).get("extensions") or {}
        self.batch_writes = SEND_BATCH in extensions
        if WRITE_NOW in extensions:
            # uvicorn's `send` is a bound method of the protocol; wrapped by a middleware, it is
            # not, and every write then goes through the writer task.
            self.write_now = getattr(getattr(environ.get("asgi.send"), "__self__", None), "write_now", None)
        return await super()._upgrade_websocket(environ)

    def flush_soon(self) -> None:
        """A packet was queued: have the node's Flusher write it at the end of this loop turn."""
        if not self.flush_due:
            self.flush_due = True
            self.server.flusher.add(self)

    def flush(self) -> None:
        """Write what is queued, from the Flusher. A writer task does it instead while one is at
        work (it takes what is queued when it next looks), and one is started for what a direct
        write cannot do: wait out flow control (with the write deadline), end the stream at the
        end mark. One writer at a time, in queue order."""
        self.flush_due = False
        queue = self.queue
        if self.write_now is None or self._writer is not None or queue.empty():
            return
        packets = queue.take(WRITE_PACKETS_MAX)
        if packets:
            try:
                written = self.write_now([wire_message(pkt) for pkt in packets])
            except Exception:  # noqa: BLE001 - the writer's own attempt fails the same way and ends it
                written = False
            if not written:
                queue.unget(packets)
        if not queue.empty():
            self._start_writer()

    async def _write(self, ws: Any, packets: list[Any]) -> None:
        if self.batch_writes:
            # Everything queued goes out in one write (server/transport/wsprotocol.py).
            await ws.asgi_send({"type": SEND_BATCH, "messages": [pkt.encode() for pkt in packets]})
        else:
            for pkt in packets:
                await ws.send(pkt.encode())

    async def _write_forever(self, ws: Any) -> None:
        deadline = self.server.write_timeout
        try:
            while True:
                if self.queue.on_put is not None and self.queue.empty():
                    self._writer = None  # all written: back to direct writes
                    return
                packets = await self.poll()
                if not packets:
                    break
                # A peer that stops reading (a zero TCP window) leaves a write waiting on flow
                # control for ever, and with it this socket, its queue and its buffers.
                async with asyncio.timeout(deadline):
                    await self._write(ws, packets)
                if self.closed:
                    # Closed by the server (disconnect, PING timeout): the CLOSE packet has gone
                    # out; closing the WebSocket ends the reader too, even if the peer stays mute.
                    break
        except TimeoutError:
            metrics.WRITE_TIMEOUTS.inc()
            log.warning("%s: aborting a WebSocket whose peer took nothing for %.0fs", self.sid, deadline)
            await self._abort(ws)
            return
        except Exception:  # noqa: BLE001 - a failed write means the peer is gone
            pass
        try:
            async with asyncio.timeout(deadline):
                await ws.close()
        except TimeoutError:
            await self._abort(ws)

    async def _abort(self, ws: Any) -> None:
        """Drop the connection without a closing handshake (which a peer that does not read would
        never complete); the reader then sees the disconnect and the handler ends."""
        if self.batch_writes:
            with contextlib.suppress(Exception):
                await ws.asgi_send({"type": ABORT})
        await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_ERROR)


class Flusher:
    """Writes the packets queued for WebSocket clients in one loop turn at the start of the next,
    from one callback per node: a detection queued for a hundred viewers costs a hundred writes,
    not also a hundred writer tasks woken up, each with its own timeout. Packets queued together
    (a commit of several detections) still leave in one write per client."""

    def __init__(self) -> None:
        self._due: list[NodeSocket] = []

    def add(self, socket: NodeSocket) -> None:
        if not self._due:
            asyncio.get_running_loop().call_soon(self._flush)
        self._due.append(socket)

    def _flush(self) -> None:
        due, self._due = self._due, []
        for socket in due:
            try:
                socket.flush()
            except Exception:  # one client's failure must not hold back the others'
                log.exception("%s: flushing its queue failed", socket.sid)


class Pinger:
    """Sends each socket's Engine.IO PING when it falls due, and closes the socket whose PONG has
    not come `ping_timeout` later, from one task per node instead of one sleeping task per
    connection. Every socket waits the same interval and the same timeout, so due times arrive in
    the order they were scheduled and two FIFOs are the whole timer structure."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._due: deque[tuple[float, str]] = deque()
        # (deadline, sid, the PING's last_ping): a socket still holding that stamp at the deadline
        # has not answered (its PONG clears last_ping, the next PING sets a new one).
        self._answers: deque[tuple[float, str, float]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def schedule(self, sid: str, delay: float) -> None:
        self._due.append((time.monotonic() + delay, sid))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="testpulse-engineio-pinger")

    async def _run(self) -> None:
        due, answers = self._due, self._answers
        try:
            while due or answers:
                first = min(due[0][0] if due else float("inf"), answers[0][0] if answers else float("inf"))
                wait = first - time.monotonic()
                if wait > 0:
                    # At least a tick: what falls due within it is handled in one wake-up, not
                    # one each (a PING or a PONG deadline per socket, spread over the interval).
                    await asyncio.sleep(max(wait, PING_TICK_SECONDS))
                now = time.monotonic()
                while due and due[0][0] <= now:
                    self._ping(due.popleft()[1], now)
                while answers and answers[0][0] <= now:
                    _, sid, stamp = answers.popleft()
                    self._close_if_silent(sid, stamp)
        finally:
            self._task = None

    def _ping(self, sid: str, now: float) -> None:
        socket = self._server.sockets.get(sid)
        if socket is None or socket.closing or socket.closed or socket.last_ping is not None:
            return
        socket.last_ping = stamp = time.time()
        socket.queue.put_nowait(_PING)
        self._answers.append((now + self._server.ping_timeout, sid, stamp))

    def _close_if_silent(self, sid: str, stamp: float) -> None:
        socket = self._server.sockets.get(sid)
        if socket is None or socket.closing or socket.closed or socket.last_ping != stamp:
            return
        log.info("%s: no PONG within the ping timeout, closing", sid)
        # In a task of its own: a close runs the disconnect handlers, and the PINGs of the other
        # sockets (thousands silent at once behind a partition) must not wait for them.
        task = asyncio.get_running_loop().create_task(self._close(socket))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, socket: Any) -> None:
        try:
            # As python-engineio's check_ping_timeout: a CLOSE packet is written (abort=False),
            # which also tells a half-open peer that it is gone.
            await socket.close(wait=False, abort=False, reason=self._server.reason.PING_TIMEOUT)
        except Exception:  # logged here: the task has no one to raise to
            log.exception("%s: closing after the ping timeout failed", socket.sid)


class RequestBody:
    """`wsgi.input` of an Engine.IO request: the ASGI body, read on demand (long-polling POSTs)."""

    __slots__ = ("_event", "_payload", "_receive")

    def __init__(self, event: dict[str, Any], receive: Any) -> None:
        self._event = event
        self._receive = receive
        self._payload: bytes | None = None

    async def read(self, length: int | None = None) -> bytes:
        if self._payload is None:
            payload = (self._event.get("body") or b"") if self._event["type"] == "http.request" else b""
            while self._event.get("more_body"):
                self._event = await self._receive()
                if self._event["type"] == "http.request":
                    payload += self._event.get("body") or b""
            self._payload = payload
        if length is None:
            data, self._payload = self._payload, b""
        else:
            data, self._payload = self._payload[:length], self._payload[length:]
        return data


async def asgi_environ(scope: dict[str, Any], receive: Any, send: Any) -> dict[str, Any]:
    """The request environ Engine.IO works on, built from an ASGI scope. python-engineio's own
    defines a class per request (freed only by the cyclic collector); this one shares one."""
    event = await receive()
    if event["type"] not in ("http.request", "websocket.connect"):
        return {}
    path = scope["path"]
    try:
        query = scope.get("query_string", b"").decode()
    except UnicodeDecodeError:
        query = ""
    environ: dict[str, Any] = {
        "wsgi.input": RequestBody(event, receive),
        "wsgi.async": True,
        "REQUEST_METHOD": scope.get("method", "GET"),
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": f"{path}?{query}" if query else path,
        "SCRIPT_NAME": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",  # the peer is in the scope (client_address() reads it there)
        "asgi.receive": receive,
        "asgi.send": send,
        "asgi.scope": scope,
    }
    for raw_name, raw_value in scope["headers"]:
        try:
            name = raw_name.decode().upper()
            value = raw_value.decode()
        except UnicodeDecodeError:
            continue
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
        elif name == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
        else:
            key = "HTTP_" + name.replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    environ["wsgi.url_scheme"] = environ.get("HTTP_X_FORWARDED_PROTO", "http")
    return environ


class LeanEngineServer(TaggedEngineServer):
    """The lean transport's Engine.IO server: tagged session ids (as the stock one), NodeSockets,
    one Pinger, and the request environ built by asgi_environ."""

    _async: dict[str, Any]  # engineio's async driver table (untyped library)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sockets = _SocketTable()
        self.pinger = Pinger(self)
        self.flusher = Flusher()
        self._async = {**self._async, "translate_request": asgi_environ}

    def create_queue(self, *args: Any, **kwargs: Any) -> PacketQueue:
        return PacketQueue()

    async def _service_task(self) -> None:
        """Forgets closed sockets once per ping timeout; the Pinger closes the silent ones.

        python-engineio's visits one socket every ping_timeout / N seconds, each visit an
        asyncio.wait_for (a task and a timer, and a wake-up of the loop): 2,500 a second at 50,000
        idle clients (docs/perf/README.md, the idle profiles). This one is a plain loop every
        ping_timeout, with no suspension per socket."""
        self.service_task_event = event = self.create_event()
        while not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=self.ping_timeout)
                break
            for sid in [sid for sid, socket in self.sockets.items() if socket.closed]:
                self.sockets.pop(sid, None)


class _SocketTable(dict[str, Any]):
    """Engine.IO's sid -> socket table. Engine.IO constructs its socket class directly, so the one
    place to make every new socket a NodeSocket is where the server registers it."""

    def __setitem__(self, sid: str, socket: Any) -> None:
        if type(socket) is engineio.async_socket.AsyncSocket:
            socket.__class__ = NodeSocket
        super().__setitem__(sid, socket)
