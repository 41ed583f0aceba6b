"""Per-node session feeds: detections reach local room members in seq order, exactly once.

Each session watched on this node has a Feed with a cursor: the last seq delivered to its live
members. Live detections (from this node's commits or from other nodes) are delivered only when
they are next after the cursor; early ones wait, and a gap that does not close by itself within
`gap_fill_delay` is read from the EventLog, which holds every acknowledged detection. So a lost or
late pub/sub message delays a detection but never drops or reorders it.

A joining client replays from the log up to the feed's cursor and is then added to the live set
with no await in between, so nothing can slip between replay and live delivery.

The ordering decisions (cursor, early buffer, gap fills, replay plan) are server/domain/ordering.py, a
pure module; this one does the reading, waiting and writing around them.

Extension: a client that joins with `batch_ms` gets `detection_batch` events, one frame carrying
every detection of a window, instead of a frame per detection: the per-frame cost is what limits
fan-out, so this is how one node serves many more deliveries per second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from testpulse import jsoncodec, metrics
from testpulse.domain.ordering import Ordering, check_last_seq
from testpulse.domain.protocol import ErrorCode, ProtocolError
from testpulse.domain.sessions import EventLog, Session, StatusHistory, StoredDetection, iso
from testpulse.domain.status_trail import StatusTrail, Verdict, replay_for

log = logging.getLogger("testpulse.realtime.feeds")

WINDOW_ITEMS_MAX = 500  # a batch window that fills up is flushed early
IDLE_SWEEP_SECONDS = 5.0  # a feed idle this long checks the store for anything it was not told of
STORE_READS_MAX = 8  # catch-up reads in flight per node: after a Redis blip every feed wants one
RETRY_SECONDS_MIN, RETRY_SECONDS_MAX = 0.5, 5.0  # a feed's failed catch-up retries with backoff
_EVENT_PREFIX = str(sio_packet.EVENT)
_EMITTED = metrics.EVENTS_EMITTED.labels("detection_event")
_EMITTED_BATCH = metrics.EVENTS_EMITTED.labels("detection_batch")
_EMITTED_UPDATE = metrics.EVENTS_EMITTED.labels("test_session_update")


@dataclass(eq=False)
class Window:
    """Members that asked for batches of `ms` milliseconds, and the detections of the open window."""

    ms: int
    members: dict[str, Any] = field(default_factory=dict)  # sid -> engine.io socket
    floors: dict[str, int] = field(default_factory=dict)  # sid -> seq it already has
    items: list[StoredDetection] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class Feed:
    session_id: str
    order: Ordering[StoredDetection]
    trail: StatusTrail
    live: dict[str, Any] = field(default_factory=dict)  # sid -> engine.io socket
    windows: dict[int, Window] = field(default_factory=dict)  # batch_ms -> window
    joining: int = 0
    last_delivery: float = field(default_factory=time.monotonic)
    catch_up: asyncio.Task[None] | None = None
    catch_up_wanted: bool = False
    retry_delay: float = RETRY_SECONDS_MIN
    status_check: asyncio.Task[None] | None = None
    status_check_wanted: bool = False
    # sid -> updated_at of the status its join answered with, for members that joined knowing a
    # change this node had not delivered yet: it must not reach them a second time.
    status_floors: dict[str, str] = field(default_factory=dict)
    # Backpressure: cleared while some member's queue is above the high-water mark.
    room: asyncio.Event = field(default_factory=asyncio.Event)
    room_watch: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.room.set()

    def sockets(self) -> list[Any]:
        return [socket for _, socket in self.members()]

    def members(self) -> list[tuple[str, Any]]:
        """(sid, engine.io socket) of every member, live or batched."""
        return [*self.live.items(), *(m for w in self.windows.values() for m in w.members.items())]

    def evict(self, sid: str) -> bool:
        """Remove a member from the live set and every window; False when it was not one."""
        found = self.live.pop(sid, None) is not None
        for window in self.windows.values():
            found = window.members.pop(sid, None) is not None or found
        return found

    def member_count(self) -> int:
        return len(self.live) + sum(len(w.members) for w in self.windows.values())


class Feeds:
    def __init__(
        self,
        sio: socketio.AsyncServer,
        log_: EventLog,
        history: StatusHistory,
        *,
        page_size: int,
        client_queue_max: int,
        gap_fill_delay: float,
        on_slow_consumer: Callable[[str], None],
    ) -> None:
        self._sio = sio
        self._log = log_
        self._history = history
        self._reads = asyncio.Semaphore(STORE_READS_MAX)
        self._page = page_size
        self._queue_max = client_queue_max
        self._gap_delay = gap_fill_delay
        self._on_slow = on_slow_consumer
        self._high_water = max(1, client_queue_max // 4)
        self._low_water = client_queue_max // 10
        self._feeds: dict[str, Feed] = {}
        self._memberships: dict[str, set[str]] = {}  # sid -> session ids it joined here
        # (sid, session id) -> the number of the latest join asked. A client that asks a join again
        # (its ack was late: socket.io-client's timeout, then a retry) supersedes the one still
        # under way, which then stops before sending more and is not seated.
        self._join_turns: dict[tuple[str, str], int] = {}

    # ---- membership --------------------------------------------------------------------------

    def attach(self, sid: str) -> None:
        self._memberships[sid] = set()

    def detach(self, sid: str) -> None:
        for session_id in self._memberships.pop(sid, set()):
            self._remove(sid, session_id)

    def leave(self, sid: str, session_id: str) -> bool:
        joined = self._memberships.get(sid)
        if joined is None or session_id not in joined:
            return False
        joined.discard(session_id)
        self._remove(sid, session_id)
        return True

    def sessions_of(self, sid: str) -> set[str]:
        return set(self._memberships.get(sid, ()))

    def claim_join(self, sid: str, session_id: str) -> int:
        """Take the next turn to join: every earlier join of this client to this session is superseded."""
        key = (sid, session_id)
        turn = self._join_turns[key] = self._join_turns.get(key, 0) + 1
        return turn

    def superseded(self, sid: str, session_id: str, turn: int) -> bool:
        return self._join_turns.get((sid, session_id), turn) != turn

    def release_join(self, sid: str, session_id: str, turn: int) -> None:
        key = (sid, session_id)
        if self._join_turns.get(key) == turn:
            del self._join_turns[key]

    async def join(
        self,
        sid: str,
        session: Session,
        last_seq: int | None,
        batch_ms: int = 0,
        status_since: str | None = None,
        *,
        turn: int,
    ) -> int:
        """Replay the status changes after `status_since` (none when it is None) and the detections
        after `last_seq` (none when it is None), then go live. Returns the number of detections
        replayed. Raises ProtocolError when the client is gone, asks beyond the log, or asked to
        join again meanwhile (`turn`, from claim_join)."""
        check_last_seq(last_seq, session.last_seq)

        def check_turn() -> None:
            if self.superseded(sid, session.id, turn):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "superseded by a later join_session of this session")

        check_turn()
        joined = self._memberships.get(sid)
        if joined is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "client is disconnecting")
        socket = self._socket(sid)
        joined.discard(session.id)
        self._remove(sid, session.id)  # a re-join restarts from the client's new last_seq
        feed = self._feed(session)
        feed.joining += 1
        try:
            if status_since is not None:
                async with self._reads:
                    transitions = await self._history.transitions(session.id)
                check_turn()
                current = (session.status.value, iso(session.updated_at))
                for update in replay_for(transitions, status_since, current):
                    self._send(socket, "test_session_update", update)
            replay = feed.order.replay(last_seq)
            replayed = 0
            while (read := replay.next_read(self._page)) is not None:
                rows = await self._log.since(session.id, read.after_seq, read.limit)
                check_turn()
                page = replay.take(rows)
                if batch_ms:
                    self._send(socket, "detection_batch", _batch(session.id, page))
                else:
                    for row in page:
                        self._send(socket, "detection_event", row.event())
                replayed += len(page)
                if sid not in self._memberships or socket.closed:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "client disconnected during replay")
                await self._drain(socket)
            # From here to the end: no await, so the feed cannot advance under us.
            if sid not in self._memberships:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "client disconnected during replay")
            check_turn()
            if batch_ms:
                window = feed.windows.get(batch_ms) or feed.windows.setdefault(batch_ms, Window(batch_ms))
                window.floors[sid] = replay.batch_floor()
                window.members[sid] = socket
            else:
                feed.order.joined(sid, replay.position)
                feed.live[sid] = socket
            self._memberships[sid].add(session.id)
            # Status changes delivered while this client replayed, after the one its ack names.
            known_at = iso(session.updated_at)
            missed = feed.trail.since(session.status.value, known_at)
            if missed is None:
                # The store is ahead of this node's trail (its announcement is still on the way, or
                # was lost): the client has that change from its ack, so hold it back from it.
                feed.status_floors[sid] = known_at
                self._want_status_check(feed)
            else:
                for update in missed:
                    self._send(socket, "test_session_update", update)
            metrics.REPLAYED.inc(replayed)
            return replayed
        finally:
            feed.joining -= 1
            self._forget_if_unused(feed)

    # ---- live path ---------------------------------------------------------------------------

    def offer(self, session_id: str, items: list[StoredDetection]) -> None:
        """Hand over detections committed anywhere in the cluster; duplicates and stale ones are ignored."""
        feed = self._feeds.get(session_id)
        if feed is None:
            return
        offered = feed.order.offer(items)
        for item in offered.deliver:
            self._deliver(feed, item)
        if offered.gap:
            self._want_catch_up(feed, delay=self._gap_delay)

    def resync(self, session_id: str | None = None) -> None:
        """Read from the log whatever a feed may have missed (after a pub/sub outage, or when a
        join sees the store ahead of the feed)."""
        feeds = self._feeds.values() if session_id is None else filter(None, [self._feeds.get(session_id)])
        for feed in list(feeds):
            self._want_catch_up(feed, delay=0.0)
            self._want_status_check(feed)

    def session_changed(self, update: dict[str, Any]) -> None:
        """Hand over a `test_session_update` committed anywhere in the cluster: delivered when it
        follows what this node delivered last, dropped when delivered already, and otherwise the
        cue to read what was missed from the store (server/domain/status_trail.py)."""
        feed = self._feeds.get(str(update.get("session_id")))
        if feed is None:
            return
        verdict = feed.trail.judge(update)
        if verdict is Verdict.DELIVER:
            self._deliver_status(feed, update)
        elif verdict is Verdict.MISSED:
            self._want_status_check(feed)

    def _deliver_status(self, feed: Feed, update: dict[str, Any]) -> None:
        feed.trail.delivered(update)
        pkt = feed_packet("test_session_update", update)
        floors = feed.status_floors
        at = str(update.get("updated_at"))
        sent = 0
        for sid, socket in feed.members():
            if floors:
                floor = floors.get(sid)
                if floor is not None:
                    if at <= floor:  # one ISO 8601 format: compares as text
                        continue
                    del floors[sid]
            if not socket.closed:
                socket.queue.put_nowait(pkt)
                sent += 1
        _EMITTED_UPDATE.inc(sent)

    def _want_status_check(self, feed: Feed) -> None:
        if feed.status_check is not None:
            feed.status_check_wanted = True
            return
        feed.status_check = asyncio.create_task(self._check_status(feed), name=f"status check {feed.session_id}")

    async def _check_status(self, feed: Feed) -> None:
        delay = RETRY_SECONDS_MIN
        try:
            while self._feeds.get(feed.session_id) is feed:
                feed.status_check_wanted = False
                try:
                    async with self._reads:
                        transitions = await self._history.transitions(feed.session_id)
                except ProtocolError as exc:
                    log.warning("status check of session %s failed (%s); retrying", feed.session_id, exc.message)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_SECONDS_MAX)
                    continue
                for update in feed.trail.missed(transitions):
                    self._deliver_status(feed, update)
                if not feed.status_check_wanted:
                    return
        finally:
            feed.status_check = None

    async def sweep_forever(self, idle_seconds: float = IDLE_SWEEP_SECONDS) -> None:
        """Safety net: a feed that heard nothing for a while reads the store once. A detection whose
        only announcement was lost (a publisher node that died between commit and publish, a
        commit that outlived its caller's timeout) still reaches viewers when nothing follows it."""
        while True:
            await asyncio.sleep(idle_seconds)
            now = time.monotonic()
            for feed in list(self._feeds.values()):
                if now - feed.last_delivery >= idle_seconds and feed.catch_up is None:
                    feed.last_delivery = now
                    self._want_catch_up(feed, delay=0.0)

    def _want_catch_up(self, feed: Feed, delay: float) -> None:
        if feed.catch_up is not None:
            feed.catch_up_wanted = True
            return
        feed.catch_up = asyncio.create_task(self._catch_up(feed, delay), name=f"catch-up {feed.session_id}")

    async def _catch_up(self, feed: Feed, delay: float) -> None:
        order = feed.order
        try:
            if delay:
                await asyncio.sleep(delay)
                for item in order.release():
                    self._deliver(feed, item)
                if not order.gap and not feed.catch_up_wanted:
                    return
            while True:
                feed.catch_up_wanted = False
                async with self._reads:
                    # Read from the cursor as it is once the read may start: it moves while we queue.
                    read = order.gap_read(self._page)
                    rows = await self._log.since(feed.session_id, read.after_seq, read.limit)
                filled = order.fill(rows, read)
                for item in filled.deliver:
                    self._deliver(feed, item)
                metrics.GAP_FILLS.inc(filled.from_store)
                if self._feeds.get(feed.session_id) is not feed:
                    return
                feed.retry_delay = RETRY_SECONDS_MIN
                if not filled.more and not feed.catch_up_wanted:
                    return
        except ProtocolError as exc:
            log.warning("catch-up of session %s failed (%s); retrying", feed.session_id, exc.message)
            await self._back_off(feed)
        except Exception:
            log.exception("catch-up of session %s failed", feed.session_id)
            await self._back_off(feed)
        finally:
            feed.catch_up = None
            if feed.catch_up_wanted and self._feeds.get(feed.session_id) is feed:
                self._want_catch_up(feed, delay=0.0)

    @staticmethod
    async def _back_off(feed: Feed) -> None:
        await asyncio.sleep(feed.retry_delay)
        feed.retry_delay = min(feed.retry_delay * 2, RETRY_SECONDS_MAX)
        feed.catch_up_wanted = True

    def _deliver(self, feed: Feed, item: StoredDetection) -> None:
        """Send one detection the ordering released (the cursor is already past it)."""
        feed.last_delivery = time.monotonic()
        metrics.DELIVERY_LAG_SECONDS.observe(max(0.0, time.time() - item.received_at.timestamp()))
        for window in feed.windows.values():
            if window.members:
                window.items.append(item)
                if len(window.items) >= WINDOW_ITEMS_MAX:
                    self._flush(feed, window)
                elif window.timer is None:
                    window.timer = asyncio.get_running_loop().call_later(window.ms / 1000, self._flush, feed, window)
        if not feed.live:
            return
        pkt = feed_packet("detection_event", item.event())
        holding = feed.order.holding(item.seq)
        sent = 0
        deepest = 0
        for sid, socket in list(feed.live.items()):
            if holding and sid in holding:
                continue
            if socket.closed:
                continue
            depth = socket.queue.qsize()
            if depth >= self._queue_max:
                feed.live.pop(sid, None)
                self._on_slow(sid)
                continue
            deepest = max(deepest, depth)
            socket.queue.put_nowait(pkt)
            sent += 1
        _EMITTED.inc(sent)
        if deepest >= self._high_water and feed.room.is_set():
            feed.room.clear()
            feed.room_watch = asyncio.create_task(self._watch_room(feed), name=f"backpressure {feed.session_id}")

    async def wait_for_room(self, session_id: str, patience: float) -> None:
        """Hold a publisher while this node's viewers of the session are far behind, so that an
        overloaded node slows its publishers instead of queueing without end. Returns at once (no
        suspension) in the normal case; raises rate_limited when the viewers stay behind."""
        feed = self._feeds.get(session_id)
        if feed is None or feed.room.is_set():
            return
        taken = {sid: socket.queue.taken for sid, socket in feed.members()}
        try:
            await asyncio.wait_for(feed.room.wait(), patience)
        except TimeoutError:
            # A member that took nothing at all while the publisher waited has stopped reading; it
            # would hold the room shut, and every publisher of the session with it, for as long as
            # its connection lasts. It goes as a slow consumer (it replays on rejoin); members that
            # are merely behind keep their place, and the publisher is asked to slow down.
            for sid, socket in feed.members():
                stalled = socket.queue.qsize() >= self._high_water and socket.queue.taken == taken.get(sid)
                if stalled and not socket.closed and feed.evict(sid):
                    self._on_slow(sid)
            metrics.RATE_LIMITED.labels("backpressure").inc()
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, "viewers of this session are behind; slow down and retry"
            ) from None

    async def _watch_room(self, feed: Feed) -> None:
        try:
            while self._feeds.get(feed.session_id) is feed:
                await asyncio.sleep(0.02)
                if max((s.queue.qsize() for s in feed.sockets() if not s.closed), default=0) <= self._low_water:
                    break
        finally:
            feed.room.set()
            feed.room_watch = None

    def _flush(self, feed: Feed, window: Window) -> None:
        if window.timer is not None:
            window.timer.cancel()
            window.timer = None
        items, window.items = window.items, []
        if not items or not window.members:
            return
        pkt = feed_packet("detection_batch", _batch(feed.session_id, items))
        sent = 0
        for sid, socket in list(window.members.items()):
            if socket.closed:
                continue
            if socket.queue.qsize() >= self._queue_max:
                window.members.pop(sid, None)
                self._on_slow(sid)
                continue
            floor = window.floors.get(sid)
            if floor is None:
                socket.queue.put_nowait(pkt)
            else:
                if items[-1].seq >= floor:
                    del window.floors[sid]
                fresh = [item for item in items if item.seq > floor]
                if not fresh:
                    continue
                socket.queue.put_nowait(feed_packet("detection_batch", _batch(feed.session_id, fresh)))
            sent += 1
        _EMITTED_BATCH.inc(sent)

    # ---- plumbing ----------------------------------------------------------------------------

    def _feed(self, session: Session) -> Feed:
        feed = self._feeds.get(session.id)
        if feed is None:
            trail = StatusTrail(session.status.value, iso(session.updated_at))
            feed = self._feeds[session.id] = Feed(session.id, Ordering(session.last_seq), trail)
        elif feed.order.lags(session.last_seq):
            # The store is ahead of what reached this node: fetch the difference for everyone.
            self._want_catch_up(feed, delay=0.0)
        return feed

    def _remove(self, sid: str, session_id: str) -> None:
        feed = self._feeds.get(session_id)
        if feed is None:
            return
        feed.live.pop(sid, None)
        feed.status_floors.pop(sid, None)
        feed.order.forget(sid)
        for window in feed.windows.values():
            window.members.pop(sid, None)
            window.floors.pop(sid, None)
        self._forget_if_unused(feed)

    def _forget_if_unused(self, feed: Feed) -> None:
        if feed.member_count() == 0 and feed.joining == 0 and self._feeds.get(feed.session_id) is feed:
            del self._feeds[feed.session_id]
            for task in (feed.catch_up, feed.status_check):
                if task is not None:
                    task.cancel()
            for window in feed.windows.values():
                if window.timer is not None:
                    window.timer.cancel()
            feed.room.set()

    def _socket(self, sid: str) -> Any:
        eio_sid = self._sio.manager.eio_sid_from_sid(sid, "/")
        socket = self._sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if socket is None or socket.closed:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "client is disconnecting")
        return socket

    def _packet(self, event: str, data: dict[str, Any]) -> eio_packet.Packet:
        encoded = self._sio.packet_class(sio_packet.EVENT, namespace="/", data=[event, data]).encode()
        return eio_packet.Packet(eio_packet.MESSAGE, encoded)

    def _send(self, socket: Any, event: str, data: dict[str, Any]) -> None:
        socket.queue.put_nowait(self._packet(event, data))
        metrics.EVENTS_EMITTED.labels(event).inc()

    def send(self, sid: str, event: str, data: dict[str, Any]) -> bool:
        """Queue one event for one local client without python-socketio's task per emit; False
        when the client is gone."""
        try:
            self._send(self._socket(sid), event, data)
        except ProtocolError:
            return False
        return True

    def send_many(self, sids: list[str], event: str, data: dict[str, Any]) -> int:
        """Queue one event for several local clients, encoded once; returns how many were still there."""
        pkt = self._packet(event, data)
        sent = 0
        for sid in sids:
            eio_sid = self._sio.manager.eio_sid_from_sid(sid, "/")
            socket = self._sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
            if socket is not None and not socket.closed:
                socket.queue.put_nowait(pkt)
                sent += 1
        metrics.EVENTS_EMITTED.labels(event).inc(sent)
        return sent

    async def _drain(self, socket: Any) -> None:
        """Let a replaying client's queue empty below half the limit before the next page."""
        # Engine.IO's queue has no drain notification, so poll it; replay is not a hot path.
        while socket.queue.qsize() > self._queue_max // 2 and not socket.closed:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    def sample_gauges(self) -> None:
        """Rooms and members on this node: O(rooms), so sampled, not recomputed on every join."""
        metrics.ROOMS.set(len(self._feeds))
        metrics.ROOM_MEMBERS.set(sum(f.member_count() for f in self._feeds.values()))


def _batch(session_id: str, items: list[StoredDetection]) -> dict[str, Any]:
    """The `detection_batch` payload (extension): detection_event payloads in seq order."""
    return {"session_id": session_id, "items": [item.event() for item in items]}


def feed_packet(event: str, data: dict[str, Any]) -> eio_packet.Packet:
    """What _packet makes, for the feeds' own events (detections, batches, status updates): a
    Socket.IO v5 EVENT to the default namespace without an ack id is "2" and the JSON of
    [event, data]. Their payloads are values read from JSON, never bytes, so python-socketio's
    Packet object and its scan of the payload for binary attachments are skipped, once per event."""
    return eio_packet.Packet(eio_packet.MESSAGE, _EVENT_PREFIX + jsoncodec.dumps([event, data]))
