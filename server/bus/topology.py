"""The seam between the manager (broker.py) and the ways a node can reach Redis: one server,
Sentinel-managed, or a Redis Cluster. Each strategy decides which pub/sub links exist and which
channels each holds; the links and the subscription set are link.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from testpulse.bus.clients import RedisClients
from testpulse.bus.link import Dispatch, Subscriptions


@dataclass(frozen=True)
class Wiring:
    """What a strategy is given by the manager that owns it."""

    clients: RedisClients
    redis: Any  # the manager's command client (probes; the slot map on a Redis Cluster)
    subscriptions: Subscriptions
    dispatch: Dispatch
    sign: Callable[[dict[str, Any]], bytes]
    probe_prefix: str  # this process's probe channels start with it
    connect_timeout: float
    probe_timeout: float
    backoff_max: float


class Topology(Protocol):
    """How this node's subscriptions reach Redis.

    The guarantee each implementation keeps: `confirmed()` holds only channels Redis confirmed on
    a connection that is up; when a connection is lost, or a channel moves between connections,
    the subscription set is told (`Subscriptions.lost`) and it asks for a catch-up once every
    needed channel is confirmed again; `probe_age()` grows on any connection that stopped hearing
    its own probes, so health turns failing instead of a node going silently deaf.
    """

    sharded: bool  # SPUBLISH, not PUBLISH
    repeat_keys_max: int  # senders (or sender and channel pairs) the manager's repeat filter keeps

    async def listen_forever(self) -> None: ...

    async def probe_once(self) -> None: ...

    def confirmed(self) -> set[str]: ...

    def reachable(self, channel: str) -> bool:
        """Whether a join should wait for `channel`'s confirmation: False while the connection that
        would hold it is down (the catch-up after it returns covers that time)."""
        ...

    def probe_age(self) -> float: ...

    def failure(self) -> str | None:
        """What is wrong with the subscriptions, for the health check; None when nothing is."""
        ...

    def repeat_key(self, sender: str, channel: str) -> str: ...

    def export_series(self) -> None: ...

    async def close(self) -> None: ...
