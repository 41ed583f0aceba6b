"""The library internals the lean transport is built on, as data, and the check that they are there.

The lean transport (server/transport/lean.py, server/transport/wsprotocol.py, the overrides of LeanTestpulseServer)
subclasses and calls names that uvicorn, python-engineio, python-socketio and websockets do not
promise to keep. Each one is listed below with what we rely on: that it exists, the parameters we
override or call it with, the instance attributes its class sets, the keys of a table, a statement
of its source. `missing()` says which of them an installed library no longer has; `auto` falls back
to the stock transport when the answer is not empty (server/transport/auto.py), and tests/unit holds the
same list against the installed versions, so an upgrade that breaks one fails there first.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

UVICORN_SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl"


@dataclass(frozen=True)
class Need:
    """One name we rely on: `path` (dotted, may be empty) inside `module`.

    params: the parameter names. For a method we override (`overridden`) they must be exactly
      these, since the library calls our version as it calls its own; for one we only call, they
      must come first and any further ones must have defaults.
    assigned: instance attributes the class (or one of its bases) sets as `self.name = ...`.
    keys: keys the object (a dict) must hold.
    source: statements the object's source must contain (a behaviour we depend on, not a name).
    """

    module: str
    path: str = ""
    params: tuple[str, ...] | None = None
    overridden: bool = False
    assigned: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    source: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}" if self.path else self.module


def _override(module: str, path: str, *params: str) -> Need:
    return Need(module, path, params=params, overridden=True)


def _call(module: str, path: str, *params: str) -> Need:
    return Need(module, path, params=params)


_SOCKET = "engineio.async_socket"
_ENGINE = "engineio.async_server"
_ASGI = "engineio.async_drivers.asgi"
_SIO = "socketio.async_server"

LEAN: tuple[Need, ...] = (
    # server/transport/wsprotocol.py: LeanWebSocketProtocol
    Need(
        UVICORN_SANSIO,
        "WebSocketsSansIOProtocol",
        assigned=(
            "loop",
            "transport",
            "conn",
            "writable",
            "disconnected",
            "handshake_complete",
            "close_sent",
            "initial_response",
            "request",
            "response",
            "scope",
            "queue",
        ),
    ),
    _override(
        UVICORN_SANSIO, "WebSocketsSansIOProtocol.__init__", "self", "config", "server_state", "app_state", "_loop"
    ),
    _override(UVICORN_SANSIO, "WebSocketsSansIOProtocol.handle_connect", "self", "event"),
    _override(UVICORN_SANSIO, "WebSocketsSansIOProtocol.send", "self", "message"),
    # The receive queue is replaced by a PacketQueue and `writable` by a Gate: uvicorn must use
    # no more of them than they have.
    Need(UVICORN_SANSIO, "WebSocketsSansIOProtocol.receive", source=("await self.queue.get()", "self.queue.empty()")),
    Need(UVICORN_SANSIO, "WebSocketsSansIOProtocol.send", source=("await self.writable.wait()",)),
    Need("uvicorn.protocols.utils", "ClientDisconnected"),
    Need("websockets.exceptions", "InvalidState"),
    _call("websockets.server", "ServerProtocol.send_text", "self", "data"),
    _call("websockets.server", "ServerProtocol.send_binary", "self", "data"),
    _call("websockets.server", "ServerProtocol.data_to_send", "self"),
    # write_now writes frames it serialized itself; the handshake's parser is replaced by the
    # frame parser it ends in.
    Need("websockets.protocol", "State"),
    Need(
        "websockets.protocol",
        "Protocol",
        assigned=("state", "extensions", "expect_continuation_frame", "reader", "parser", "parser_exc", "writes"),
    ),
    _call("websockets.protocol", "Protocol.parse", "self"),
    Need("websockets.server", "ServerProtocol.parse", source=("yield from super().parse()",)),
    Need("websockets.streams", "StreamReader", assigned=("buffer", "eof")),
    _call("websockets.frames", "Frame.serialize", "self", "mask", "extensions"),
    # server/transport/lean.py: NodeSocket
    Need(
        _SOCKET,
        "AsyncSocket",
        assigned=("server", "sid", "queue", "last_ping", "connected", "upgrading", "upgraded", "closing", "closed"),
    ),
    _override(_SOCKET, "AsyncSocket.poll", "self"),
    _override(_SOCKET, "AsyncSocket.handle_post_request", "self", "environ"),
    _override(_SOCKET, "AsyncSocket.send", "self", "pkt"),
    _override(_SOCKET, "AsyncSocket.close", "self", "wait", "abort", "reason"),
    _override(_SOCKET, "AsyncSocket.schedule_ping", "self"),
    _override(_SOCKET, "AsyncSocket._websocket_handler", "self", "ws"),
    _override(_SOCKET, "AsyncSocket._upgrade_websocket", "self", "environ"),
    _call(_SOCKET, "AsyncSocket.check_ping_timeout", "self"),
    _call(_SOCKET, "AsyncSocket.receive", "self", "pkt"),
    # server/transport/lean.py: LeanEngineServer, _SocketTable, Pinger, asgi_environ
    Need(
        _ENGINE, "AsyncServer", assigned=("sockets", "_async", "ping_interval", "ping_timeout", "max_http_buffer_size")
    ),
    # _SocketTable makes every new socket a NodeSocket where the server registers it; the server
    # starts its service task there too (LeanEngineServer's, which replaces the stock sweep, and
    # which shutdown stops through the event it creates).
    Need(
        _ENGINE,
        "AsyncServer._handle_connect",
        source=("async_socket.AsyncSocket(self, sid)", "self.sockets[sid] = s", "self._service_task"),
    ),
    _override(_ENGINE, "AsyncServer._service_task", "self"),
    Need(_ENGINE, "AsyncServer.shutdown", source=("self.service_task_event.set()", "await self.service_task_handle")),
    Need("engineio.base_server", "BaseServer.reason.PING_TIMEOUT"),
    Need(_ASGI, "_async", keys=("translate_request", "websocket")),
    _override(_ASGI, "translate_request", "scope", "receive", "send"),
    Need(_ASGI, "WebSocket", assigned=("asgi_send",)),
    _call(_ASGI, "WebSocket.wait", "self"),
    _call(_ASGI, "WebSocket.send", "self", "message"),
    _call(_ASGI, "WebSocket.close", "self"),
    # server/realtime/handlers.py: LeanTestpulseServer
    _override(_SIO, "AsyncServer._handle_connect", "self", "eio_sid", "namespace", "data"),
    _override(_SIO, "AsyncServer._handle_eio_message", "self", "eio_sid", "data"),
    _override(
        _SIO, "AsyncServer._handle_event_internal", "self", "server", "sid", "eio_sid", "data", "namespace", "id"
    ),
)

# Used by both transports: sid tagging, the counting queue, the stock guards, the delivery feeds.
SHARED: tuple[Need, ...] = (
    _override(_SIO, "AsyncServer._engineio_server_class", "self"),
    Need("socketio.base_server", "BaseServer", assigned=("eio", "manager", "packet_class")),
    _call("socketio.base_manager", "BaseManager.eio_sid_from_sid", "self", "sid", "namespace"),
    _call("socketio.base_manager", "BaseManager.sid_from_eio_sid", "self", "eio_sid", "namespace"),
    _call("socketio.base_manager", "BaseManager.is_connected", "self", "sid", "namespace"),
    _override("socketio.packet", "Packet.decode", "self", "encoded_packet"),
    _override("socketio.packet", "Packet.add_attachment", "self", "attachment"),
    _override(_ENGINE, "AsyncServer.generate_id", "self"),
    _override(_ENGINE, "AsyncServer.create_queue", "self", "args", "kwargs"),
    Need("engineio.base_server", "BaseServer", assigned=("sockets", "handlers")),
)

# server/bus/broker.py: ClusterManager keeps python-socketio's manager interface and replaces its
# plumbing: it publishes through its own outbox (`_publish`), runs its own listener (so `initialize`
# must not start the stock one), and hands the stock messages to the stock handlers. No stock
# fallback: a Redis manager that lacks one of these refuses to start (ClusterManager.__init__).
_PUBSUB = "socketio.async_pubsub_manager"
BROKER: tuple[Need, ...] = (
    _override(_PUBSUB, "AsyncPubSubManager._publish", "self", "data"),
    _override(_PUBSUB, "AsyncPubSubManager.initialize", "self"),
    *(
        _call(_PUBSUB, f"AsyncPubSubManager._handle_{method}", "self", "message")
        for method in ("emit", "callback", "disconnect", "enter_room", "leave_room", "close_room")
    ),
    Need(_PUBSUB, "AsyncPubSubManager", assigned=("channel", "host_id")),
    Need("socketio.base_manager", "BaseManager", assigned=("rooms",)),
)

# server/bus/cluster.py: sharded pub/sub in redis.asyncio (redis-py 8.0 on; pyproject.toml admits older
# ones for everything else), and the slot map of its RedisCluster, read again when a slot moves
# (no public call refreshes it; the client itself calls this after MOVED). No stock fallback exists
# (python-socketio has no Redis Cluster manager): the Redis Cluster topology (RedisClusterShards)
# refuses to start without them.
REDIS_CLUSTER: tuple[Need, ...] = (
    _call("redis.asyncio.client", "PubSub.ssubscribe", "self"),
    _call("redis.asyncio.client", "PubSub.sunsubscribe", "self"),
    _call("redis.asyncio.cluster", "RedisCluster.spublish", "self", "shard_channel", "message"),
    Need("redis.asyncio.cluster", "RedisCluster", assigned=("nodes_manager",)),
    _call("redis.asyncio.cluster", "NodesManager.initialize", "self"),
    _call("redis.asyncio.cluster", "RedisCluster.get_node_from_key", "self", "key"),
    Need("redis.asyncio.cluster", "ClusterNode", assigned=("name", "host", "port")),
    Need("redis.crc", "key_slot"),
)

Importer = Callable[[str], Any]


def missing(needs: Iterable[Need], importer: Importer = importlib.import_module) -> list[str]:
    """What of `needs` the installed libraries lack, one line each ("module.path: why")."""
    found: list[str] = []
    for need in needs:
        why = _check(need, importer)
        if why:
            found.append(f"{need.name}: {why}")
    return found


def _check(need: Need, importer: Importer) -> str:
    try:
        obj = importer(need.module)
    except ImportError:
        return "module not found"
    for part in filter(None, need.path.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return "not found"
    if need.params is not None:
        why = _params(obj, need.params, need.overridden)
        if why:
            return why
    absent = [key for key in need.keys if not isinstance(obj, dict) or key not in obj]
    if absent:
        return f"no key {', '.join(absent)}"
    if need.assigned:
        unset = [attr for attr in need.assigned if not _assigns(obj, attr)]
        if unset:
            return f"sets no self.{', self.'.join(unset)}"
    if need.source:
        text = _source(obj)
        lost = [line for line in need.source if line not in text]
        if lost:
            return f"source no longer has {' / '.join(lost)}"
    return ""


def _params(obj: Any, expected: tuple[str, ...], exact: bool) -> str:
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return "has no signature"
    names = tuple(p.name for p in params)
    if exact:
        return "" if names == expected else f"parameters are ({', '.join(names)}), expected ({', '.join(expected)})"
    extra = params[len(expected) :]
    if names[: len(expected)] != expected or any(
        p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in extra
    ):
        return f"parameters are ({', '.join(names)}), expected ({', '.join(expected)}, ...)"
    return ""


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _assigns(obj: Any, attr: str) -> bool:
    """Whether a class of `obj`'s hierarchy sets `self.attr` (instance attributes exist only once
    an instance does, so the class source is where to look)."""
    pattern = re.compile(rf"\bself\.{re.escape(attr)}\s*(?::[^=\n]+)?=(?!=)")
    classes = obj.__mro__ if isinstance(obj, type) else (obj,)
    return any(pattern.search(_source(cls)) for cls in classes if cls is not object)
