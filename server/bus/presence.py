"""The presence board on Redis: a hash per session with a field per node process, and a heartbeat per process.

    {prefix}:presence:{session_id}          hash  field = instance, value = {"sub": [role, connections]}
    {prefix}:presence:alive:{instance}      string, set every second with a TTL

server/domain/presence.py says why this shape. Every call is one pipeline (no transaction: each node
writes only its own fields, so there is nothing to race), a read is two.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from redis import asyncio as aioredis

from testpulse.domain.presence import Members

HEARTBEAT_TTL_SECONDS = 10
HASH_TTL_SECONDS = 24 * 3600  # a session nobody has written to for a day is forgotten by Redis itself
HASH_TTL_REFRESH_SECONDS = 3600.0  # each node renews that expiry at most this often per session


class RedisBoard:
    def __init__(
        self,
        redis: aioredis.Redis,
        instance: str,
        *,
        announce: Callable[[str], None],
        prefix: str = "testpulse",
        timeout: float = 2.0,
        heartbeat_ttl: int = HEARTBEAT_TTL_SECONDS,
    ) -> None:
        self._redis = redis
        self.instance = instance
        self._announce = announce
        self._prefix = prefix
        self._timeout = timeout
        self._ttl = heartbeat_ttl
        self._renewed: dict[str, float] = {}  # session id -> when this node last renewed the hash's expiry

    def _hash(self, session_id: str) -> str:
        return f"{self._prefix}:presence:{session_id}"

    def _alive(self, instance: str) -> str:
        return f"{self._prefix}:presence:alive:{instance}"

    async def write(self, entries: dict[str, Members]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        now = time.monotonic()
        renewing = []
        for session_id, members in entries.items():
            key = self._hash(session_id)
            if members:
                wire = {sub: [role, connections] for sub, (role, connections) in members.items()}
                pipe.hset(key, self.instance, json.dumps(wire, separators=(",", ":")))
                if now - self._renewed.get(session_id, -HASH_TTL_REFRESH_SECONDS) >= HASH_TTL_REFRESH_SECONDS:
                    pipe.expire(key, HASH_TTL_SECONDS)
                    renewing.append(session_id)
            else:
                pipe.hdel(key, self.instance)
                self._renewed.pop(session_id, None)
        async with asyncio.timeout(self._timeout):
            await pipe.execute()
        for session_id in renewing:
            self._renewed[session_id] = now
        for session_id in entries:
            self._announce(session_id)

    async def read(self, session_ids: list[str]) -> dict[str, list[Members]]:
        pipe = self._redis.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.hgetall(self._hash(session_id))
        async with asyncio.timeout(self._timeout):
            hashes: list[dict[Any, Any]] = await pipe.execute()
        fields = [{_text(k): v for k, v in h.items()} for h in hashes]
        others = sorted({instance for h in fields for instance in h} - {self.instance})
        if not others:
            return {session_id: [] for session_id in session_ids}
        pipe = self._redis.pipeline(transaction=False)
        for instance in others:
            pipe.exists(self._alive(instance))
        async with asyncio.timeout(self._timeout):
            found = await pipe.execute()
        alive = {instance for instance, exists in zip(others, found, strict=True) if exists}
        dead = set(others) - alive
        result: dict[str, list[Members]] = {}
        cleanup = self._redis.pipeline(transaction=False)
        for session_id, h in zip(session_ids, fields, strict=True):
            result[session_id] = [_members(v) for instance, v in h.items() if instance in alive]
            stale = [instance for instance in h if instance in dead]
            if stale:
                cleanup.hdel(self._hash(session_id), *stale)
        if dead:
            # A dead node's fields would be skipped by every reader forever; the first to see them removes them.
            async with asyncio.timeout(self._timeout):
                await cleanup.execute()
        return result

    async def heartbeat(self) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        key = self._alive(self.instance)
        pipe.exists(key)
        pipe.set(key, b"1", ex=self._ttl)
        async with asyncio.timeout(self._timeout):
            existed, _ = await pipe.execute()
        if not existed:
            self._renewed.clear()  # whatever lost the heartbeat lost the expiries too
        return bool(existed)

    async def withdraw(self, session_ids: list[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.hdel(self._hash(session_id), self.instance)
        pipe.delete(self._alive(self.instance))
        await pipe.execute()
        for session_id in session_ids:
            self._announce(session_id)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _members(raw: Any) -> Members:
    """One node's field; what does not parse counts as nobody (it is that node's to rewrite)."""
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    members: Members = {}
    for sub, entry in data.items():
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int):
            members[str(sub)] = (entry[0], entry[1])
    return members
