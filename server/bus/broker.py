"""Session rooms across nodes: our python-socketio client manager over Redis.

python-socketio's AsyncRedisManager publishes every message on one channel, so every node decodes
every message; it drops what it cannot publish while Redis is away and backs off up to 60 s.
ClusterManager keeps its interface (rooms, emit, disconnect across nodes) and changes the
plumbing:

- routing by room: an emit to a session room goes to that room's channel, and a node subscribes
  to a room's channel only while one of its clients is in the room;
- an outbox: publishing never blocks a handler; messages wait (bounded) while Redis is away and go
  out in order when it returns;
- a listener that reconnects with bounded, jittered backoff and a self-probe that notices a
  subscription that stopped receiving; after every (re)subscription the feeds catch up from the
  store, so detections acknowledged while Redis was away still reach every viewer;
- signed messages: each carries an HMAC of the cluster key, and anything else on the channels is
  ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import socketio
from redis import asyncio as aioredis

from testpulse import metrics
from testpulse.bus.clients import RedisClients
from testpulse.bus.outbox import Message, Outbox, Publisher, RepeatFilter
from testpulse.domain.sessions import ROOM_PREFIX, StoredDetection, session_room
from testpulse.store.tables import detection_from_wire
from testpulse.transport import internals

log = logging.getLogger("testpulse.bus.broker")
_CHANNELS_WANTED = metrics.REDIS_CHANNELS.labels("wanted")
_CHANNELS_CONFIRMED = metrics.REDIS_CHANNELS.labels("confirmed")

SIGNATURE_BYTES = 16
LISTEN_SLICE_BUSY = 0.01  # seconds per pub/sub read while subscriptions are pending
LISTEN_SLICE_IDLE = 0.05  # otherwise; also the longest a first join into a new room waits to subscribe
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
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._probe_channel = f"{prefix}:probe:{self.host_id}"
        self._wanted: set[str] = set()  # room channels this node's clients need
        self._subscribed: set[str] = set()  # channels Redis confirmed on the current connection
        self._requested: set[str] = set()  # asked for on the current connection, not yet confirmed
        self._dirty = False  # _wanted or _waiters changed since the last reconcile
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._last_probe = time.monotonic()
        self._link_up = False
        self._catch_up_pending = False
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._pubsub_client: aioredis.Redis | None = None
        self._master_moved = False  # Sentinel named a new master: resubscribe there
        self.on_detections: Callable[[str, list[StoredDetection]], None] = lambda _s, _d: None
        self.on_status: Callable[[dict[str, Any]], None] = lambda _u: None
        self.on_resubscribed: Callable[[], None] = lambda: None
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
        self.redis = self._client()
        self._sent = 0  # the number of this node's last outbox message
        self._repeats = RepeatFilter()
        self._outbox = Outbox(
            publisher or RedisPublisher(self.redis, sharded=self._clients.cluster_mode),
            capacity=outbox_max,
            timeout=connect_timeout,
            backoff_max=backoff_max,
            after_overflow=self._announce_resync,
        )

    def _client(self) -> Any:
        return self._clients.new()

    # ---- lifecycle ---------------------------------------------------------------------------

    def initialize(self) -> None:
        # Not super().initialize(): that starts the stock listener, which this class replaces.
        socketio.AsyncManager.initialize(self)
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="testpulse-redis-listener"),
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
        await self._drop_pubsub()
        await self.redis.aclose()
        await self._clients.close()

    # ---- health ------------------------------------------------------------------------------

    def probe_age(self) -> float:
        return time.monotonic() - self._last_probe

    async def health(self) -> str:
        """'ok', or what is failing."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready"
            return f"failing: {type(exc).__name__}: {exc}"[:200]
        if not self._link_up:
            return "failing: subscription is down"
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
            self._wanted.add(self._room_channel(room))
            self._dirty = True

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        if isinstance(room, str) and room.startswith(ROOM_PREFIX) and room not in self.rooms.get(namespace, {}):
            self._wanted.discard(self._room_channel(room))
            self._dirty = True

    async def enter_room(self, sid: str, namespace: str, room: Any, eio_sid: str | None = None) -> None:
        await super().enter_room(sid, namespace, room, eio_sid=eio_sid)
        if isinstance(room, str) and room.startswith(ROOM_PREFIX):
            await self.subscribed(self._room_channel(room))

    async def subscribed(self, channel: str, wait_seconds: float = 2.0) -> None:
        """Wait until Redis confirms the subscription, so that whatever is published after this
        returns reaches this node. While Redis is away, return at once: the catch-up after the
        link returns covers that time."""
        if channel in self._subscribed or not self._link_up:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        self._dirty = True
        try:
            await asyncio.wait_for(waiter, wait_seconds)
        except TimeoutError:
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
        self._outbox.put(channel, self._sign({**message, SENDER_KEY: self.host_id, NUMBER_KEY: self._sent}))

    def _announce_resync(self) -> None:
        # Some messages were dropped while Redis was away: have every node re-read the store.
        self._enqueue(self.channel, {"method": "resync", "host_id": self.host_id})

    def _sign(self, message: dict[str, Any]) -> bytes:
        body = json.dumps(message, separators=(",", ":")).encode()
        return hmac.new(self._key, body, hashlib.sha256).digest()[:SIGNATURE_BYTES] + body

    def _verify(self, raw: bytes) -> dict[str, Any] | None:
        if not isinstance(raw, bytes) or len(raw) <= SIGNATURE_BYTES:
            return None
        signature, body = raw[:SIGNATURE_BYTES], raw[SIGNATURE_BYTES:]
        expected = hmac.new(self._key, body, hashlib.sha256).digest()[:SIGNATURE_BYTES]
        if not hmac.compare_digest(signature, expected):
            return None
        try:
            message = json.loads(body)
        except ValueError:
            return None
        return message if isinstance(message, dict) and isinstance(message.get("method"), str) else None

    # ---- listening ---------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        backoff = 0.1
        first = True
        while True:
            try:
                await self._open_pubsub()
                if not first:
                    metrics.REDIS_RECONNECTS.inc()
                first = False
                backoff = 0.1
                await self._receive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect
                log.warning("Redis subscription lost (%s: %s); reconnecting", type(exc).__name__, exc)
            self._link_up = False
            await self._drop_pubsub()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max)

    async def _open_pubsub(self) -> None:
        client = self._client()
        self._pubsub_client, self._master_moved = client, False
        self._pubsub = client.pubsub()
        self._subscribed.clear()
        self._requested = set(self._wanted)
        self._dirty = True
        async with asyncio.timeout(self._connect_timeout):
            await self._pubsub.subscribe(self.channel, self._probe_channel, *self._wanted)
        self._last_probe = time.monotonic()
        self._link_up = True
        self._catch_up_pending = True

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        client, self._pubsub_client = self._pubsub_client, None
        self._subscribed.clear()
        if pubsub is not None and client is not None:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
            # lands as aclose() finishes, and the listener then outlives close() (a node that never exits).
            with contextlib.suppress(Exception):  # the connection is being thrown away anyway
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()
                    await client.aclose()

    async def _receive(self) -> None:
        while True:
            if self._master_moved:
                raise ConnectionError("Sentinel names a new Redis master: resubscribing there")
            await self._reconcile()
            # The listener sends subscriptions between reads: while joins are waiting for one it
            # reads in short slices so they go out within ~10 ms; otherwise in longer ones, so
            # that an idle node does not wake a hundred times a second.
            busy = self._dirty or self._waiters or self._requested
            message = await self._pubsub.get_message(timeout=LISTEN_SLICE_BUSY if busy else LISTEN_SLICE_IDLE)
            if message is None:
                if self.probe_age() > self._probe_timeout:
                    raise ConnectionError(f"no probe for {self.probe_age():.1f}s: subscription is deaf")
                continue
            kind = message.get("type")
            channel = message.get("channel")
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind == "subscribe":
                self._confirm(channel)
            elif kind == "message":
                await self._dispatch(channel, message.get("data"))

    async def _reconcile(self) -> None:
        """Bring the connection's subscriptions in line with the rooms this node's clients are in."""
        if not self._dirty:
            return
        self._dirty = False
        base = {self.channel, self._probe_channel}
        needed = self._wanted | set(self._waiters)
        missing = needed - self._subscribed - self._requested - base
        if missing:
            self._requested |= missing
            await self._pubsub.subscribe(*missing)
        extra = (self._subscribed | self._requested) - needed - base
        if extra:
            self._subscribed -= extra
            self._requested -= extra
            await self._pubsub.unsubscribe(*extra)

    def _confirm(self, channel: str) -> None:
        if channel == self.channel and channel in self._subscribed:
            # A second confirmation of the control channel on one pub/sub object: redis-py lost the
            # connection and subscribed again by itself, below this listener. Whatever was published
            # in between must be read from the store, as after a reconnect of our own.
            metrics.REDIS_RECONNECTS.inc()
            self._catch_up_pending = True
        self._requested.discard(channel)
        self._subscribed.add(channel)
        if channel not in self._wanted and channel not in self._waiters:
            self._dirty = True  # left meanwhile: the next reconcile unsubscribes
        for waiter in self._waiters.pop(channel, []):
            if not waiter.done():
                waiter.set_result(None)
        if self._catch_up_pending and (self._wanted | {self.channel, self._probe_channel}) <= self._subscribed:
            # Every channel is live again: whatever was published meanwhile is in the store.
            self._catch_up_pending = False
            self.on_resubscribed()

    async def _dispatch(self, channel: str, raw: Any) -> bool:
        """Handle one message from `channel`; False when it was not a verified message of ours."""
        message = self._verify(raw)
        if message is None:
            metrics.REDIS_MESSAGES_RECEIVED.labels("rejected").inc()
            return False
        method = message["method"]
        # Any verified message proves the subscription hears; a busy node may read its own probe
        # late, and must not mistake that for a deaf connection.
        self._last_probe = time.monotonic()
        if method == "probe":
            return True
        if self._is_repeat(message, channel):
            metrics.REDIS_MESSAGES_RECEIVED.labels("repeat").inc()
            return True
        if message.get("host_id") == self.host_id and method != "callback":
            return True
        metrics.REDIS_MESSAGES_RECEIVED.labels(method if method in _KNOWN_METHODS else "other").inc()
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
        # One connection hears each sender's numbers rising, whatever the channel: `channel` is
        # for ShardedClusterManager, whose connections (one per shard) interleave them.
        sender, number = message.get(SENDER_KEY), message.get(NUMBER_KEY)
        if not isinstance(sender, str) or not isinstance(number, int):
            return False  # a node from before message numbers: nothing to compare with
        return self._repeats.is_repeat(self._repeat_key(sender, channel), number)

    def _repeat_key(self, sender: str, channel: str) -> str:
        return sender

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
            _CHANNELS_WANTED.set(len(self._wanted))
            _CHANNELS_CONFIRMED.set(len(self._wanted & self._subscribed) if self._link_up else 0)
            if not self._link_up:
                continue
            if self._clients.sentinel_managed:
                await self._follow_master()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self.redis.publish(self._probe_channel, self._sign({"method": "probe"}))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed probe shows up as probe age
                pass

    async def _follow_master(self) -> None:
        """Sentinel: move to a new master (see server/bus/clients.py for why the connections do
        not by themselves). Until every node has moved, some publish on the old master and some
        listen on the new one, so the node that moves asks every node to re-read the store: its
        resync goes out on the new master, where the nodes that moved earlier listen."""
        listener = self._pubsub_client
        try:
            async with asyncio.timeout(self._connect_timeout):
                publisher_moved = await self._clients.master_moved(self.redis)
                listener_moved = listener is not None and await self._clients.master_moved(listener)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Sentinels unreachable or mid-failover: ask again next tick
            log.debug("asking the Sentinels for the master failed: %s", exc)
            return
        if listener_moved and listener is self._pubsub_client:
            self._master_moved = True
        if publisher_moved or listener_moved:
            log.warning("Sentinel names a new Redis master; moving to it")
            self._announce_resync()


_KNOWN_METHODS = frozenset(
    {
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
    }
)


def cluster_key(secret: str) -> bytes:
    """The key that signs cross-node messages, derived from the shared JWT secret."""
    return hmac.new(secret.encode(), b"testpulse-cluster-messages", hashlib.sha256).digest()
