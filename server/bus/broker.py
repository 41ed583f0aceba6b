"""Session rooms across nodes: our python-socketio client manager over Redis.

python-socketio's AsyncRedisManager publishes every message on one channel, so every node decodes
every message; it drops what it cannot publish while Redis is away and backs off up to 60 s.
ClusterManager keeps its interface (rooms, emit, disconnect across nodes) and changes the
plumbing:

- routing by room: an emit to a session room goes to that room's channel, and a node subscribes
  to a room's channel only while one of its clients is in the room;
- an outbox: publishing never blocks a handler; messages wait (bounded) while Redis is away and go
  out in order when it returns;
- listening through a Topology strategy (topology.py: single.py, sentinel.py, cluster.py over
  link.py's shared subscription set and pub/sub link): links reconnect with bounded, jittered
  backoff, a self-probe notices a subscription that stopped receiving, and after every
  (re)subscription the feeds catch up from the store, so detections acknowledged while Redis was
  away still reach every viewer;
- signed messages: each carries an HMAC of the cluster key, and anything else on the channels is
  ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Any

import socketio

from testpulse import jsoncodec, metrics
from testpulse.bus.clients import RedisClients
from testpulse.bus.cluster import RedisClusterShards
from testpulse.bus.link import Subscriptions
from testpulse.bus.outbox import Message, Outbox, Publisher, RepeatFilter
from testpulse.bus.sentinel import SentinelRedis
from testpulse.bus.single import SingleRedis
from testpulse.bus.topology import Topology, Wiring
from testpulse.domain.sessions import ROOM_PREFIX, StoredDetection, session_room
from testpulse.store.tables import detection_from_wire
from testpulse.transport import internals

__all__ = ["ClusterManager", "RedisPublisher", "cluster_key", "detection_from_wire"]

log = logging.getLogger("testpulse.bus.broker")
_CHANNELS_WANTED = metrics.REDIS_CHANNELS.labels("wanted")
_CHANNELS_CONFIRMED = metrics.REDIS_CHANNELS.labels("confirmed")

SIGNATURE_BYTES = 16
SENDER_KEY, NUMBER_KEY = "from", "n"  # on every outbox message: who sent it, and its number there


class RedisPublisher:
    """The outbox's Publisher over Redis: one pipeline (no transaction) per batch. `sharded`:
    SPUBLISH on a RedisCluster, whose pipeline sends each master its commands in order."""

    def __init__(self, redis: Any, *, sharded: bool = False) -> None:
        self._redis = redis
        self._sharded = sharded

    async def publish_many(self, messages: Sequence[Message]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for channel, payload in messages:
            if self._sharded:
                pipe.spublish(channel, payload)
            else:
                pipe.publish(channel, payload)
        await pipe.execute()


class ClusterManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    name = "testpulse-redis"

    def __init__(
        self,
        url: str,
        *,
        key: bytes,
        prefix: str = "testpulse",
        probe_interval: float = 1.0,
        probe_timeout: float = 3.0,
        backoff_max: float = 2.0,
        outbox_max: int = 100_000,
        connect_timeout: float = 2.0,
        publisher: Publisher | None = None,
    ) -> None:
        lacking = internals.missing(internals.BROKER)
        if lacking:
            raise RuntimeError(f"this python-socketio lacks what the Redis manager relies on: {'; '.join(lacking)}")
        super().__init__(url=url, channel=f"{prefix}:control")
        self._key = key
        self._prefix = prefix
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._connect_timeout = connect_timeout
        self._subscriptions = Subscriptions(self.channel)
        self._tasks: list[asyncio.Task[None]] = []
        self.on_detections: Callable[[str, list[StoredDetection]], None] = lambda _s, _d: None
        self.on_status: Callable[[dict[str, Any]], None] = lambda _u: None
        self.on_presence: Callable[[str], None] = lambda _s: None
        # Our own clients, not python-socketio's: built for any accepted URL, Sentinel's included.
        self._clients = RedisClients(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=connect_timeout,
            socket_keepalive=True,
            health_check_interval=10,
            retry_on_timeout=False,
        )
        # No socket_timeout on the client that publishes: redis-py bounds a write with it through
        # asyncio.wait_for, which on Python 3.11 runs the write in a task of its own, so a PUBLISH
        # waited for the rest of the loop turn (this node's own fan-out to its viewers: 1.7 ms
        # p50 from enqueue to the other nodes at 100 viewers x 200/s, 0.7 ms without). Every
        # command on this client is bounded by an asyncio.timeout of ours instead (the outbox's,
        # health's, the probes' and presence's), which cancels a stalled one the same way.
        self.redis = self._clients.new(socket_timeout=None)
        self._wiring = Wiring(
            clients=self._clients,
            redis=self.redis,
            subscriptions=self._subscriptions,
            dispatch=self._dispatch,
            sign=self._sign,
            probe_prefix=f"{prefix}:probe:{self.host_id}",
            connect_timeout=connect_timeout,
            probe_timeout=probe_timeout,
            backoff_max=backoff_max,
        )
        self._topology = self._topology_for(self._wiring)
        self._sent = 0  # the number of this node's last outbox message
        # How this node's own messages begin (_enqueue puts the sender first): Redis hands every
        # publish back to its sender, and those echoes are dropped before they are decoded.
        self._echo_prefix = jsoncodec.dumps_bytes({SENDER_KEY: self.host_id})[:-1] + b","
        self._repeats = RepeatFilter(senders_max=self._topology.repeat_keys_max)
        self._outbox = Outbox(
            publisher or RedisPublisher(self.redis, sharded=self._topology.sharded),
            capacity=outbox_max,
            timeout=connect_timeout,
            backoff_max=backoff_max,
            after_overflow=self._announce_resync,
        )

    def _topology_for(self, wiring: Wiring) -> Topology:
        if self._clients.cluster_mode:
            return RedisClusterShards(wiring)
        if self._clients.sentinel_managed:
            return SentinelRedis(wiring, self._announce_resync)
        return SingleRedis(wiring)

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def on_resubscribed(self) -> Callable[[], None]:
        """Called once every needed channel is confirmed after a connection was lost or rebuilt."""
        return self._subscriptions.on_resubscribed

    @on_resubscribed.setter
    def on_resubscribed(self, callback: Callable[[], None]) -> None:
        self._subscriptions.on_resubscribed = callback

    # ---- lifecycle ---------------------------------------------------------------------------

    def initialize(self) -> None:
        # Not super().initialize(): that starts the stock listener, which the topology replaces.
        socketio.AsyncManager.initialize(self)
        self._tasks = [
            asyncio.create_task(self._topology.listen_forever(), name="testpulse-redis-listener"),
            asyncio.create_task(self._outbox.publish_forever(), name="testpulse-redis-publisher"),
            asyncio.create_task(self._probe_forever(), name="testpulse-redis-probe"),
        ]

    async def flush(self, grace_seconds: float) -> bool:
        """Wait until the outbox is empty (used when draining); False if it could not empty in time."""
        return await self._outbox.flush(grace_seconds)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._topology.close()
        await self.redis.aclose()
        await self._clients.close()

    # ---- health ------------------------------------------------------------------------------

    def probe_age(self) -> float:
        return self._topology.probe_age()

    async def health(self) -> str:
        """'ok', or what is failing."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready"
            return f"failing: {type(exc).__name__}: {exc}"[:200]
        failure = self._topology.failure()
        if failure is not None:
            return f"failing: {failure}"
        if self.probe_age() > self._probe_timeout:
            return f"failing: subscription probe is {self.probe_age():.1f}s old"
        return "ok"

    # ---- socket.io manager interface ---------------------------------------------------------

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str | None = None,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        room = to or room
        namespace = namespace or "/"
        if isinstance(room, str) and (self.is_connected(room, namespace) or kwargs.get("ignore_queue")):
            # A client of this node: no other node has it, so Redis need not hear of it.
            await socketio.AsyncManager.emit(
                self, event, data, namespace, room=room, skip_sid=skip_sid, callback=callback
            )
            return
        await super().emit(event, data, namespace=namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs)

    async def disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        # is_pre_connected is newer than the lowest python-socketio admitted (5.16.3).
        pre_connected = getattr(self, "is_pre_connected", None)
        if self.is_connected(sid, namespace) or (pre_connected is not None and pre_connected(sid, namespace)):
            await socketio.AsyncManager.disconnect(self, sid, namespace)
            return
        await super().disconnect(sid, namespace, **kwargs)

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: str | None = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        if isinstance(room, str) and room.startswith(ROOM_PREFIX):
            self._subscriptions.want(self._room_channel(room))

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        if isinstance(room, str) and room.startswith(ROOM_PREFIX) and room not in self.rooms.get(namespace, {}):
            self._subscriptions.unwant(self._room_channel(room))

    async def enter_room(self, sid: str, namespace: str, room: Any, eio_sid: str | None = None) -> None:
        await super().enter_room(sid, namespace, room, eio_sid=eio_sid)
        if isinstance(room, str) and room.startswith(ROOM_PREFIX):
            await self.subscribed(self._room_channel(room))

    async def subscribed(self, channel: str, wait_seconds: float = 2.0) -> None:
        """Wait until Redis confirms the subscription, so that whatever is published after this
        returns reaches this node. While the connection that would hold it is down, return at
        once: the catch-up after the link returns covers that time."""
        if channel in self._topology.confirmed() or not self._topology.reachable(channel):
            return
        if not await self._subscriptions.wait(channel, wait_seconds):
            log.warning("subscription to %s not confirmed within %.1fs", channel, wait_seconds)

    def _room_channel(self, room: str) -> str:
        return f"{self._prefix}:room:{room}"

    # ---- publishing --------------------------------------------------------------------------

    def publish_status(self, update: dict[str, Any]) -> None:
        session_id = str(update["session_id"])
        message = {"method": "status", "session_id": session_id, "update": update, "host_id": self.host_id}
        self._enqueue(self._room_channel(session_room(session_id)), message)

    def publish_detections(self, session_id: str, items: list[StoredDetection]) -> None:
        message = {
            "method": "detections",
            "session_id": session_id,
            "items": [d.event() for d in items],
            "host_id": self.host_id,
        }
        self._enqueue(self._room_channel(session_room(session_id)), message)

    def publish_presence(self, session_id: str) -> None:
        """Tell the nodes watching `session_id` that its presence entries changed (server/domain/presence.py)."""
        message = {"method": "presence", "session_id": session_id, "host_id": self.host_id}
        self._enqueue(self._room_channel(session_room(session_id)), message)

    async def _publish(self, data: dict[str, Any]) -> None:
        room = data.get("room") if data.get("method") == "emit" else None
        channel = self._room_channel(room) if isinstance(room, str) and room.startswith(ROOM_PREFIX) else self.channel
        self._enqueue(channel, data)

    def _enqueue(self, channel: str, message: dict[str, Any]) -> None:
        # "host_id" is not the sender for every method (a callback names its destination), so the
        # sender and its message number travel under their own keys, for the receivers' RepeatFilter.
        self._sent += 1
        numbered = {SENDER_KEY: self.host_id, NUMBER_KEY: self._sent}
        if message.get("method") == "callback":
            # Not echo-shaped: a callback's "host_id" is its destination, which may be this node.
            numbered = {**message, **numbered}
        else:
            numbered.update(message)
        self._outbox.put(channel, self._sign(numbered))

    def _announce_resync(self) -> None:
        # Some messages were dropped while Redis was away: have every node re-read the store.
        self._enqueue(self.channel, {"method": "resync", "host_id": self.host_id})

    def _sign(self, message: dict[str, Any]) -> bytes:
        body = jsoncodec.dumps_bytes(message)
        return hmac.new(self._key, body, hashlib.sha256).digest()[:SIGNATURE_BYTES] + body

    def _signed_body(self, raw: Any) -> bytes | None:
        if not isinstance(raw, bytes) or len(raw) <= SIGNATURE_BYTES:
            return None
        signature, body = raw[:SIGNATURE_BYTES], raw[SIGNATURE_BYTES:]
        expected = hmac.new(self._key, body, hashlib.sha256).digest()[:SIGNATURE_BYTES]
        return body if hmac.compare_digest(signature, expected) else None

    # ---- receiving ---------------------------------------------------------------------------

    async def _dispatch(self, channel: str, raw: Any) -> bool:
        """Handle one message from `channel`; False when it was not a verified message of ours."""
        body = self._signed_body(raw)
        if body is None:
            _REJECTED.inc()
            return False
        if body.startswith(self._echo_prefix):
            return True  # our own publish, handed back: verified (it proves the link hears), not needed
        try:
            message = jsoncodec.loads(body)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("method"), str):
            _REJECTED.inc()
            return False
        method = message["method"]
        if method == "probe":
            return True
        if self._is_repeat(message, channel):
            _REPEATS.inc()
            return True
        if message.get("host_id") == self.host_id and method != "callback":
            return True
        _RECEIVED.get(method, _RECEIVED_OTHER).inc()
        try:
            if method == "detections":
                self._on_detections(message)
            elif method == "status":
                update = message.get("update")
                if isinstance(update, dict) and update.get("session_id") == message.get("session_id"):
                    self.on_status(update)
            elif method == "presence":
                session_id = message.get("session_id")
                if isinstance(session_id, str):
                    self.on_presence(session_id)
            elif method == "resync":
                self.on_resubscribed()
            elif method == "emit":
                await self._handle_emit(message)
            elif method == "callback":
                await self._handle_callback(message)
            elif method == "disconnect":
                await self._handle_disconnect(message)
            elif method == "enter_room":
                await self._handle_enter_room(message)
            elif method == "leave_room":
                await self._handle_leave_room(message)
            elif method == "close_room":
                await self._handle_close_room(message)
        except Exception:
            log.exception("handling a %s message failed", method)
        return True

    def _is_repeat(self, message: dict[str, Any], channel: str) -> bool:
        sender, number = message.get(SENDER_KEY), message.get(NUMBER_KEY)
        if not isinstance(sender, str) or not isinstance(number, int):
            return False  # a node from before message numbers: nothing to compare with
        return self._repeats.is_repeat(self._topology.repeat_key(sender, channel), number)

    def _on_detections(self, message: dict[str, Any]) -> None:
        session_id, items = message.get("session_id"), message.get("items")
        if not isinstance(session_id, str) or not isinstance(items, list):
            return
        parsed = [detection_from_wire(item, session_id) for item in items]
        self.on_detections(session_id, [d for d in parsed if d is not None])

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            metrics.REDIS_PROBE_AGE_SECONDS.set(self.probe_age())
            # A deaf channel, not only a deaf connection: wanted above confirmed for long is a fault.
            wanted = self._subscriptions.wanted
            _CHANNELS_WANTED.set(len(wanted))
            _CHANNELS_CONFIRMED.set(len(wanted & self._topology.confirmed()))
            self._topology.export_series()
            await self._topology.probe_once()


_KNOWN_METHODS = (
    "detections",
    "status",
    "presence",
    "resync",
    "emit",
    "callback",
    "disconnect",
    "enter_room",
    "leave_room",
    "close_room",
)
# Bound once: labels() looks its child up under a lock on every call, once per message here.
_RECEIVED = {method: metrics.REDIS_MESSAGES_RECEIVED.labels(method) for method in _KNOWN_METHODS}
_RECEIVED_OTHER = metrics.REDIS_MESSAGES_RECEIVED.labels("other")
_REJECTED = metrics.REDIS_MESSAGES_RECEIVED.labels("rejected")
_REPEATS = metrics.REDIS_MESSAGES_RECEIVED.labels("repeat")


def cluster_key(secret: str) -> bytes:
    """The key that signs cross-node messages, derived from the shared JWT secret."""
    return hmac.new(secret.encode(), b"testpulse-cluster-messages", hashlib.sha256).digest()
