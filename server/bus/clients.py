"""redis.asyncio clients for any accepted Redis URL: plain, TLS, unix socket, Sentinel-managed or
a Redis Cluster's seed nodes.

A Sentinel-managed client asks the Sentinels for the master's address whenever it opens a
connection, so a connection opened after a failover reaches the new master. A connection opened
before it does not notice on its own: a demoted master keeps taking PUBLISH and SUBSCRIBE (they
are not writes, so no READONLY), for seconds as a master of nobody, then as a replica whose
publishes never reach the new master; the Sentinels' CLIENT KILL spares pub/sub connections. A
node on it would hear its own probe and no one else, so `master_moved` compares, on demand,
where a client's connections went with where the Sentinels say the master is now.
"""

from __future__ import annotations

from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from testpulse.urls import is_cluster_url, normalise_redis_url, parse_cluster_url, parse_sentinel_url

# Options the plain client takes and RedisCluster does not (it retries by its own rules).
_PLAIN_ONLY_OPTIONS = ("retry_on_timeout",)


class RedisClients:
    """Makes clients of one Redis URL (any form settings accept), each with its own connections,
    all with the same options (timeouts, keepalive...)."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = normalise_redis_url(url)
        self._options = options
        self._sentinel: Sentinel | None = None
        self._cluster_login: dict[str, Any] | None = None
        if is_cluster_url(self.url):
            seeds = parse_cluster_url(self.url)
            self._seeds = seeds.seeds
            credentials: dict[str, Any] = {"username": seeds.username, "password": seeds.password}
            self._cluster_login = {key: value for key, value in credentials.items() if value is not None}
            if seeds.tls:
                self._cluster_login["ssl"] = True
        if self.url.startswith("redis+sentinel://"):
            target = parse_sentinel_url(self.url)
            self._service = target.service_name
            login = {"db": target.db, "username": target.username, "password": target.password}
            # Options without a password reach the Sentinels too (their socket_* ones); the login is the master's.
            self._sentinel = Sentinel(list(target.sentinels), **options)  # type: ignore[no-untyped-call]
            self._master_options: dict[str, Any] = {key: value for key, value in login.items() if value is not None}

    @property
    def sentinel_managed(self) -> bool:
        return self._sentinel is not None

    @property
    def cluster_mode(self) -> bool:
        """A Redis Cluster: new() makes RedisCluster clients, and pub/sub is sharded (server/bus/cluster.py)."""
        return self._cluster_login is not None

    def new(self, **overrides: Any) -> Any:
        """A client with a pool of its own (a pub/sub connection is dropped whole when it goes deaf):
        an aioredis.Redis, or a RedisCluster for a Redis Cluster URL (same command methods).
        `overrides` replace the constructor's options for this client alone."""
        options = self._options | overrides
        if self._cluster_login is not None:
            options = {k: v for k, v in options.items() if k not in _PLAIN_ONLY_OPTIONS}
            seeds = [ClusterNode(host, port) for host, port in self._seeds]
            return RedisCluster(startup_nodes=seeds, **self._cluster_login, **options)
        if self._sentinel is not None:
            # The Sentinel holds the options already; these reach the master's connections only.
            client: aioredis.Redis = self._sentinel.master_for(self._service, **self._master_options, **overrides)
            return client
        return aioredis.Redis.from_url(self.url, **options)

    def shard(self, host: str, port: int) -> aioredis.Redis:
        """A plain client of one Redis Cluster master (a pub/sub connection pinned to that shard),
        with the cluster's login and options. It never reconnects by itself: redis-py would
        resubscribe every shard channel in one SSUBSCRIBE, which a master refuses (CROSSSLOT) as
        soon as they span two slots; its owner (server/bus/cluster.py) opens a new one instead."""
        assert self._cluster_login is not None, "shard() is for Redis Cluster URLs"
        once = Retry(NoBackoff(), 0)
        return aioredis.Redis(host=host, port=port, retry=once, **self._cluster_login, **self._options)

    async def master_moved(self, client: aioredis.Redis) -> bool:
        """Sentinel only: True when the master the Sentinels name is no longer the one `client`
        connected to; every connection of `client` is then closed (in use too) so that each
        reconnects to the new master. False for other URLs, and for a client that never connected."""
        if self._sentinel is None:
            return False
        pool: Any = client.connection_pool
        before = pool.master_address
        now = await pool.get_master_address()
        if before is None or before == now:
            return False
        await pool.disconnect(inuse_connections=True)
        return True

    async def close(self) -> None:
        """Close the connections to the Sentinels themselves (clients from new() close their own)."""
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
