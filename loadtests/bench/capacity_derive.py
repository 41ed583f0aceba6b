"""From the phases' counters to the unit costs of the capacity model, and the costs file.

Node CPU per event is a fit, not a division: each publishing window mixes store transactions,
stored detections, Redis messages decoded and deliveries, in proportions that differ between the
windows and between the nodes (the publisher's node stores, every node delivers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loadtests.bench.capacity_fit import nonnegative_least_squares
from loadtests.bench.capacity_probe import Counters, node_cpu, postgres_ops, redis_commands, summary

US = 1e6


def per(value: float, count: float, scale: float = 1.0) -> float | None:
    return value * scale / count if count else None


def costs(
    args: argparse.Namespace,
    nodes: list[str],
    phases: dict[str, Counters],
    connected: int,
    joined: int,
    presence_joined: int,
    published: int,
    changes: int,
    subscriber_nodes: int,
    frame_bytes: int,
) -> dict[str, Any]:
    connect, join, presence, publish = phases["connect"], phases["join"], phases["presence"], phases["publish"]
    big, small, status, replay = phases["fanout"], phases["fanout_small"], phases["status"], phases["replay"]
    kb = 1 / 1024

    # Node CPU of each node in each publishing window = store transactions x a + detections stored
    # x b + Redis messages decoded x c + deliveries x d: least squares over (window, node).
    fitted_phases = [phases[name] for name in ("publish", "publish_fast", "fanout", "fanout_small")]
    observations, targets = [], []
    for phase in fitted_phases:
        for n in nodes:
            observations.append(
                [
                    phase[f"{n}.store_transactions"],
                    phase[f"{n}.detections_stored"],
                    phase[f"{n}.redis_received_detections"],
                    phase[f"{n}.detection_events"],
                ]
            )
            targets.append(phase[f"cpu.{n}"])
    c_transaction, c_stored, c_message, c_delivery = nonnegative_least_squares(observations, targets)
    residuals = [
        t - sum(c * x for c, x in zip((c_transaction, c_stored, c_message, c_delivery), row, strict=True))
        for row, t in zip(observations, targets, strict=True)
    ]
    # Group commit: a transaction takes what arrived while the previous one ran, so detections per
    # transaction grow with the rate a node stores: batch = 1 + rate x w, w fitted through the windows.
    points = []
    for phase in fitted_phases:
        for n in nodes:
            rows_, txns = phase[f"{n}.detections_stored"], phase[f"{n}.store_transactions"]
            if rows_ > 0 and txns > 0:
                points.append((rows_ / phase["wall"], rows_ / txns - 1.0))
    batching_s = max(0.0, sum(r * b for r, b in points) / sum(r * r for r, _ in points)) if points else 0.0
    c_publish = node_cpu(publish, nodes) / published
    deliveries = big["node.detection_events"]
    messages_published = big["node.redis_published"]
    replayed = replay["node.replayed"]
    return {
        "node_cpu_us": {
            "per_connect": per(node_cpu(connect, nodes), connected, US),
            "per_connect_and_join": per(node_cpu(join, nodes), joined, US),
            "per_join": per(node_cpu(join, nodes), joined, US) - per(node_cpu(connect, nodes), connected, US),  # type: ignore[operator]
            "per_presence_join": per(node_cpu(presence, nodes), presence_joined, US),
            "per_publish": c_publish * US,
            "per_store_transaction": c_transaction * US,
            "per_stored_detection": c_stored * US,
            "per_delivery": c_delivery * US,
            "per_message_decoded": c_message * US,
            "fit_residual_rms": (sum(r * r for r in residuals) / len(residuals)) ** 0.5 * US,
            "fit_observations": len(residuals),
            "per_status_change": per(node_cpu(status, nodes), changes, US),
            "per_replayed_detection": per(node_cpu(replay, nodes), replayed, US),
            "idle_per_node_per_s": sum(phases_baseline_cpu(phases, nodes)) / len(nodes) * US,  # µs of CPU a second
        },
        "database_cpu_us": {
            "per_stored_detection": per(
                sum(phases[p].get("cpu.postgres", 0.0) for p in ("publish", "publish_fast")),
                sum(phases[p]["node.detections_stored"] for p in ("publish", "publish_fast")),
                US,
            ),
            "per_stored_detection_200_per_s": per(publish.get("cpu.postgres", 0.0), published, US),
            "per_join": per(join.get("cpu.postgres", 0.0), joined, US),
            "per_replayed_detection": per(replay.get("cpu.postgres", 0.0), replayed, US),
        }
        if "cpu.postgres" in publish
        else None,
        "proxy_cpu_us": {
            "per_connect_and_join": per(join.get("cpu.nginx", 0.0), joined, US),
            "per_delivery": per(big.get("cpu.nginx", 0.0), deliveries, US),
        },
        "memory_kb": {
            "per_idle_client": per(sum(connect[f"rss.{n}"] for n in nodes), connected, kb),
            "per_joined_client": per(sum(join[f"rss.{n}"] for n in nodes), joined, kb),
        },
        "bytes": {
            "per_delivery_to_viewer": frame_bytes,
            "redis_in_per_detection": per(publish["redis.net_in"], published),
            "redis_out_per_message_per_subscriber_node": per(
                big["redis.net_out"], messages_published * max(1, subscriber_nodes)
            ),
        },
        "redis": {
            "messages_per_detection": per(messages_published, big["node.detections_stored"]),
            "subscriber_nodes_in_fanout": subscriber_nodes,
            "ops_per_detection_unwatched": redis_commands(publish, published),
            "ops_per_detection_watched": redis_commands(big, big["node.detections_stored"]),
            "ops_per_join": redis_commands(join, joined),
            "ops_per_presence_join": redis_commands(presence, presence_joined),
            "ops_per_status_change": redis_commands(status, changes),
            "ops_per_replaying_join": redis_commands(replay, args.replay_clients),
            "cpu_us_per_message_in_fanout": per(big["redis.cpu"], messages_published, US),
        },
        "database": {
            "detections_per_transaction": per(publish["node.detections_stored"], publish["node.store_transactions"]),
            "detections_per_transaction_fast": per(
                phases["publish_fast"]["node.detections_stored"], phases["publish_fast"]["node.store_transactions"]
            ),
            "group_commit_batching_s": batching_s,
            "detections_per_transaction_fanout": per(big["node.detections_stored"], big["node.store_transactions"]),
            "postgres_per_detection": postgres_ops(publish, published) or None,
            "postgres_per_join": postgres_ops(join, joined) or None,
            "postgres_per_replaying_join": postgres_ops(replay, args.replay_clients) or None,
            "postgres_per_status_change": postgres_ops(status, changes) or None,
        },
        "counts": {
            "connected": connected,
            "joined": joined,
            "presence_joined": presence_joined,
            "published_unwatched": published,
            "deliveries_fanout": deliveries,
            "deliveries_fanout_small": small["node.detection_events"],
            "status_changes": changes,
            "replayed": replayed,
        },
    }


def phases_baseline_cpu(phases: dict[str, Counters], nodes: list[str]) -> list[float]:
    # The idle baseline (CPU seconds per second) is kept beside the phases under "_baseline".
    base = phases.get("_baseline", {})
    return [base.get(f"cpu.{n}", 0.0) for n in nodes]


def write_costs(path: Path, store: str, measured: dict[str, Any], environment_: dict[str, Any]) -> None:
    """Replace this store's section of the costs file; the other store's section stays."""
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    document.setdefault(
        "about", "Unit costs measured by `python -m loadtests.bench capacity-costs`; see docs/capacity.md"
    )
    document.setdefault("stores", {})
    keep = (
        "node_cpu_us",
        "database_cpu_us",
        "proxy_cpu_us",
        "memory_kb",
        "bytes",
        "redis",
        "database",
        "database_size",
        "redis_pubsub",
    )
    document["stores"][store] = summary(
        {key: measured[key] for key in keep}
        | {
            "measured": {
                "command": environment_["command"],
                "started": environment_["started"],
                "git_commit": environment_.get("git_commit"),
                "nodes": measured["settings"]["nodes"],
                "rate": measured["settings"]["rate"],
                "viewers": measured["settings"]["viewers"],
                "cpus": environment_["cpus"],
            }
        }
    )
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
