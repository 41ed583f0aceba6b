"""`python -m loadtests.capacity`: what a workload takes (nodes, Redis shards, database writes and
size, bandwidth) from the unit costs measured by `python -m loadtests.bench capacity-costs`
(loadtests/capacity_costs.json). docs/capacity.md explains the model and its limits.

    python -m loadtests.capacity --sessions 1000 --viewers-per-session 100 --rate 200
    python -m loadtests.capacity --sessions 1000 --viewers-per-session 100 --rate 200 --placement affinity
    python -m loadtests.capacity --sessions 20 --viewers-per-session 25 --rate 20 --nodes 3   # utilisation of 3 nodes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

COSTS_FILE = Path(__file__).resolve().parent / "capacity_costs.json"
DAY = 86400.0
MAX_NODES = 10_000_000


@dataclass(frozen=True)
class Workload:
    sessions: int
    viewers_per_session: int
    rate: float  # detections/s per session

    @property
    def viewers(self) -> int:
        return self.sessions * self.viewers_per_session

    @property
    def detections_per_s(self) -> float:
        return self.sessions * self.rate

    @property
    def deliveries_per_s(self) -> float:
        return self.sessions * self.viewers_per_session * self.rate


# One connected client's heartbeats and token checks per second, idle or not: 2.95% of a core for
# 15,000 (`python -m loadtests.bench connections`, docs/connections.md), unless a store's section
# of the costs file has its own.
HELD_CONNECTION_CPU_US = 2.0


@dataclass(frozen=True)
class Costs:
    """The unit costs the model uses (one store's section of the costs file)."""

    cpu_us_per_transaction: float  # one group-commit transaction of detections
    cpu_us_per_stored_detection: float  # validation, seq, the row, the Redis publish, the ack
    cpu_us_per_delivery: float
    cpu_us_per_message_decoded: float
    cpu_us_idle_per_node_per_s: float
    proxy_cpu_us_per_delivery: float
    kb_per_joined_client: float
    redis_messages_per_detection: float
    redis_ops_per_detection: float
    redis_cpu_us_per_message: float
    redis_cpu_us_per_subscriber: float
    redis_bytes_in_per_detection: float
    redis_bytes_out_per_message_per_subscriber: float
    bytes_per_delivery: float
    group_commit_batching_s: float  # detections per transaction = 1 + a node's store rate x this
    db_bytes_per_detection: float
    db_cpu_us_per_stored_detection: float | None = None  # PostgreSQL server CPU (not measured on SQLite)
    # Given instead of the fit: the batch a deployment's commit latency makes (docs/capacity.md).
    detections_per_transaction: float | None = None
    cpu_us_per_held_connection_per_s: float = HELD_CONNECTION_CPU_US

    @classmethod
    def from_section(cls, section: dict[str, Any], redis_fit: str = "spublish_pipelined_1") -> Costs:
        cpu, redis, size = section["node_cpu_us"], section["redis"], section["database_size"]
        fit = section["redis_pubsub"]["fit"][redis_fit]
        # The standalone test brackets what a node's traffic costs (one message per round trip, or a
        # hundred): the cluster's own measurement fixes the level, the standalone test the slope by
        # subscriber count.
        in_cluster, seen = redis["cpu_us_per_message_in_fanout"], redis["subscriber_nodes_in_fanout"]
        scale = in_cluster / (fit["base_us"] + fit["per_subscriber_us"] * seen) if in_cluster else 1.0
        return cls(
            cpu_us_per_transaction=cpu["per_store_transaction"],
            cpu_us_per_stored_detection=cpu["per_stored_detection"],
            cpu_us_per_delivery=cpu["per_delivery"],
            cpu_us_per_message_decoded=cpu["per_message_decoded"],
            cpu_us_idle_per_node_per_s=max(0.0, cpu["idle_per_node_per_s"]),
            proxy_cpu_us_per_delivery=section["proxy_cpu_us"]["per_delivery"],
            kb_per_joined_client=section["memory_kb"]["per_joined_client"],
            redis_messages_per_detection=redis["messages_per_detection"],
            redis_ops_per_detection=sum(redis["ops_per_detection_watched"].values()),
            redis_cpu_us_per_message=fit["base_us"] * scale,
            redis_cpu_us_per_subscriber=fit["per_subscriber_us"] * scale,
            redis_bytes_in_per_detection=section["bytes"]["redis_in_per_detection"],
            redis_bytes_out_per_message_per_subscriber=section["bytes"]["redis_out_per_message_per_subscriber_node"],
            bytes_per_delivery=section["bytes"]["per_delivery_to_viewer"],
            group_commit_batching_s=section["database"]["group_commit_batching_s"],
            db_bytes_per_detection=size["bytes_per_detection"],
            db_cpu_us_per_stored_detection=(section.get("database_cpu_us") or {}).get("per_stored_detection"),
            cpu_us_per_held_connection_per_s=cpu.get("per_held_connection_per_s", HELD_CONNECTION_CPU_US),
        )


@dataclass(frozen=True)
class Limits:
    """What one node process (one core) and one Redis shard (one core) may be given."""

    node_utilisation: float = 0.7
    node_memory_mb: float = 2048.0
    redis_utilisation: float = 0.7
    placement: str = "spread"  # spread: viewers land on any node; affinity: a session's viewers share nodes
    retention_days: float = 30.0


@dataclass(frozen=True)
class Plan:
    nodes: int
    binding: str
    node_cpu_cores: float
    node_utilisation: float
    subscribed_nodes_per_session: float
    messages_decoded_per_node_per_s: float
    memory_mb_per_node: float
    deliveries_per_s: float
    detections_per_s: float
    proxy_cores: float
    redis_messages_per_s: float
    redis_ops_per_s: float
    redis_cpu_cores: float
    redis_shards: int
    redis_in_mb_per_s: float
    redis_out_mb_per_s: float
    hottest_session_redis_core_share: float
    db_rows_per_s: float
    db_transactions_per_s: float
    db_cpu_cores: float | None
    db_gb_per_day: float
    db_gb_per_month: float
    db_gb_retained: float
    viewer_egress_mb_per_s: float


def subscribed_nodes(viewers: int, nodes: int, placement: str, session_cores: float, utilisation: float) -> float:
    """Nodes with at least one viewer of a session, so subscribed to its channel. Spread: each
    viewer on a node at random, the expected count N(1 - (1 - 1/N)^v). Affinity: as few nodes as
    hold the session's own load."""
    if nodes <= 1 or viewers <= 0:
        return float(min(nodes, max(viewers, 0)) or 0)
    if placement == "affinity":
        return float(min(nodes, max(1, math.ceil(session_cores / utilisation))))
    if placement != "spread":
        raise ValueError(f"placement is spread or affinity, not {placement!r}")
    return nodes * (1.0 - (1.0 - 1.0 / nodes) ** viewers)


def transactions_per_s(work: Workload, costs: Costs, nodes: int) -> float:
    """Group commit: with publishers spread over the nodes, each node stores detections_per_s / nodes
    and a transaction takes 1 + that rate x batching_s of them (or the batch given)."""
    if costs.detections_per_transaction is not None:
        return work.detections_per_s / max(1.0, costs.detections_per_transaction)
    per_node = work.detections_per_s / nodes
    return work.detections_per_s / (1.0 + per_node * costs.group_commit_batching_s)


def node_cpu_us(work: Workload, costs: Costs, nodes: int, subscribed: float) -> float:
    """CPU µs per second over all nodes: store transactions and stored detections, Redis messages
    decoded (every subscribed node but the publisher's own), deliveries, every held connection's
    heartbeats and each node's idle work."""
    messages = work.detections_per_s * costs.redis_messages_per_detection
    decoded = messages * subscribed * (1.0 - 1.0 / nodes) if nodes > 1 else 0.0
    return (
        transactions_per_s(work, costs, nodes) * costs.cpu_us_per_transaction
        + work.detections_per_s * costs.cpu_us_per_stored_detection
        + decoded * costs.cpu_us_per_message_decoded
        + work.deliveries_per_s * costs.cpu_us_per_delivery
        + work.viewers * costs.cpu_us_per_held_connection_per_s
        + nodes * costs.cpu_us_idle_per_node_per_s
    )


def plan(work: Workload, costs: Costs, limits: Limits = Limits(), nodes: int | None = None) -> Plan:
    """The node count that fits CPU and memory (or `nodes`, given), and the rest of the bill."""
    session_cores = work.viewers_per_session * work.rate * costs.cpu_us_per_delivery / 1e6
    memory_mb = work.viewers * costs.kb_per_joined_client / 1024.0
    by_memory = max(1, math.ceil(memory_mb / limits.node_memory_mb))
    binding = "given"
    if nodes is None:
        count, binding = max(1, by_memory), "node memory"
        while True:
            subscribed = subscribed_nodes(
                work.viewers_per_session, count, limits.placement, session_cores, limits.node_utilisation
            )
            needed = math.ceil(node_cpu_us(work, costs, count, subscribed) / (limits.node_utilisation * 1e6))
            if needed <= count:
                break
            if count >= MAX_NODES:
                binding = "no node count fits: every node decodes every session's messages (use affinity)"
                break
            count, binding = min(MAX_NODES, max(needed, count + 1)), "node CPU"
        nodes = count
        if nodes == 1 and binding == "node memory":
            binding = "one node suffices"
    subscribed = subscribed_nodes(
        work.viewers_per_session, nodes, limits.placement, session_cores, limits.node_utilisation
    )
    cpu = node_cpu_us(work, costs, nodes, subscribed)
    messages = work.detections_per_s * costs.redis_messages_per_detection
    decoded_per_node = messages * subscribed * (1.0 - 1.0 / nodes) / nodes if nodes > 1 else 0.0
    if binding == "node CPU" and decoded_per_node * costs.cpu_us_per_message_decoded > 0.5 * cpu / nodes:
        binding = "node CPU, mostly decoding Redis messages of sessions whose viewers are spread over many nodes"
    per_message = costs.redis_cpu_us_per_message + costs.redis_cpu_us_per_subscriber * subscribed
    redis_cpu = messages * per_message / 1e6
    hottest = work.rate * costs.redis_messages_per_detection * per_message / 1e6
    day_gb = work.detections_per_s * DAY * costs.db_bytes_per_detection / 1e9
    return Plan(
        nodes=nodes,
        binding=binding,
        node_cpu_cores=cpu / 1e6,
        node_utilisation=cpu / 1e6 / nodes,
        subscribed_nodes_per_session=subscribed,
        messages_decoded_per_node_per_s=decoded_per_node,
        memory_mb_per_node=memory_mb / nodes,
        deliveries_per_s=work.deliveries_per_s,
        detections_per_s=work.detections_per_s,
        proxy_cores=work.deliveries_per_s * costs.proxy_cpu_us_per_delivery / 1e6,
        redis_messages_per_s=messages,
        redis_ops_per_s=work.detections_per_s * costs.redis_ops_per_detection,
        redis_cpu_cores=redis_cpu,
        redis_shards=max(1, math.ceil(redis_cpu / limits.redis_utilisation)),
        redis_in_mb_per_s=work.detections_per_s * costs.redis_bytes_in_per_detection / 1e6,
        redis_out_mb_per_s=messages * subscribed * costs.redis_bytes_out_per_message_per_subscriber / 1e6,
        hottest_session_redis_core_share=hottest,
        db_rows_per_s=work.detections_per_s,
        db_transactions_per_s=transactions_per_s(work, costs, nodes),
        db_cpu_cores=(
            work.detections_per_s * costs.db_cpu_us_per_stored_detection / 1e6
            if costs.db_cpu_us_per_stored_detection is not None
            else None
        ),
        db_gb_per_day=day_gb,
        db_gb_per_month=day_gb * 30,
        db_gb_retained=day_gb * limits.retention_days,
        viewer_egress_mb_per_s=work.deliveries_per_s * costs.bytes_per_delivery / 1e6,
    )


def load_costs(path: Path, store: str, redis_fit: str = "spublish_pipelined_1") -> Costs:
    document = json.loads(path.read_text())
    stores = document["stores"]
    if store not in stores:
        raise SystemExit(f"{path} has no costs for {store!r} (measured: {', '.join(stores)})")
    return Costs.from_section(stores[store], redis_fit)


def render(work: Workload, result: Plan, store: str, limits: Limits) -> str:
    rows = [
        ("workload", f"{work.sessions:,} sessions x {work.viewers_per_session:,} viewers x {work.rate:g} detections/s"),
        ("viewers", f"{work.viewers:,}"),
        ("deliveries/s", f"{result.deliveries_per_s:,.0f}"),
        ("nodes (1 core each)", f"{result.nodes:,} at {100 * result.node_utilisation:.0f}% CPU ({result.binding})"),
        ("node CPU, cores", f"{result.node_cpu_cores:,.1f}"),
        ("node memory per node", f"{result.memory_mb_per_node:,.0f} MB"),
        ("nodes subscribed per session", f"{result.subscribed_nodes_per_session:,.1f} ({limits.placement})"),
        ("Redis messages decoded per node/s", f"{result.messages_decoded_per_node_per_s:,.0f}"),
        ("proxy (nginx) cores", f"{result.proxy_cores:,.1f}"),
        ("Redis messages/s (SPUBLISH)", f"{result.redis_messages_per_s:,.0f}"),
        ("Redis ops/s", f"{result.redis_ops_per_s:,.0f}"),
        ("Redis CPU cores / shards", f"{result.redis_cpu_cores:,.2f} / {result.redis_shards:,}"),
        ("hottest session: share of a Redis core", f"{100 * result.hottest_session_redis_core_share:.2f}%"),
        ("Redis in / out", f"{result.redis_in_mb_per_s:,.1f} / {result.redis_out_mb_per_s:,.1f} MB/s"),
        (f"DB ({store}) rows/s, transactions/s", f"{result.db_rows_per_s:,.0f}, {result.db_transactions_per_s:,.0f}"),
        ("DB server CPU for the writes, cores", "-" if result.db_cpu_cores is None else f"{result.db_cpu_cores:,.1f}"),
        ("DB size per day / month", f"{result.db_gb_per_day:,.1f} / {result.db_gb_per_month:,.0f} GB"),
        (f"DB size at {limits.retention_days:g} days retention", f"{result.db_gb_retained:,.0f} GB"),
        (
            "viewer egress",
            f"{result.viewer_egress_mb_per_s:,.1f} MB/s ({8 * result.viewer_egress_mb_per_s:,.0f} Mbit/s)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.capacity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--viewers-per-session", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="detections/s per session")
    parser.add_argument("--nodes", type=int, help="a given node count: its utilisation instead of a size")
    parser.add_argument("--store", default="postgresql", help="postgresql or sqlite: whose measured costs")
    parser.add_argument("--placement", default="spread", choices=("spread", "affinity"))
    parser.add_argument("--node-utilisation", type=float, default=0.7, help="CPU share a node may use")
    parser.add_argument("--node-memory-mb", type=float, default=2048.0, help="memory a node process may use")
    parser.add_argument("--redis-utilisation", type=float, default=0.7, help="CPU share a Redis shard may use")
    parser.add_argument(
        "--redis-fit",
        default="spublish_pipelined_1",
        help="which Redis pub/sub measurement: spublish_pipelined_1 (light traffic) or _100 (heavy)",
    )
    parser.add_argument(
        "--detections-per-transaction",
        type=float,
        help="the group-commit batch instead of the fitted one (it follows the database's commit latency)",
    )
    parser.add_argument("--retention-days", type=float, default=30.0)
    parser.add_argument("--costs", type=Path, default=COSTS_FILE)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    work = Workload(args.sessions, args.viewers_per_session, args.rate)
    limits = Limits(
        args.node_utilisation, args.node_memory_mb, args.redis_utilisation, args.placement, args.retention_days
    )
    costs = load_costs(args.costs, args.store, args.redis_fit)
    if args.detections_per_transaction is not None:
        costs = replace(costs, detections_per_transaction=args.detections_per_transaction)
    result = plan(work, costs, limits, args.nodes)
    print(json.dumps(asdict(result), indent=2) if args.json else render(work, result, args.store, limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
