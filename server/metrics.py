"""Every Prometheus metric of a node, in one place. Labels carry bounded values only."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

NODE_INFO = Gauge(
    "testpulse_node_info",
    "Always 1; labels name this node, its version and its transport (`lean` or `stock`, TESTPULSE_TRANSPORT).",
    ["node", "version", "transport"],
)
CONNECTED_CLIENTS = Gauge("testpulse_connected_clients", "Socket.IO clients connected to this node now.", ["transport"])
CONNECTS = Counter("testpulse_connects_total", "Socket.IO connections accepted.")
DISCONNECTS = Counter("testpulse_disconnects_total", "Socket.IO disconnections, by reason.", ["reason"])
CONNECT_REFUSED = Counter("testpulse_connect_refused_total", "Connections refused, by contract code.", ["code"])
EVENTS_RECEIVED = Counter(
    "testpulse_events_received_total",
    "Client events handled, by event and outcome (ok or error code).",
    ["event", "outcome"],
)
EVENTS_EMITTED = Counter("testpulse_events_emitted_total", "Server events sent to clients, by event.", ["event"])
HANDLER_SECONDS = Histogram(
    "testpulse_handler_seconds",
    "Time to handle one client event or HTTP call, by event.",
    ["event"],
    buckets=LATENCY_BUCKETS,
)
DETECTIONS_STORED = Counter("testpulse_detections_stored_total", "Detections committed to the store by this node.")
STORE_WRITE_SECONDS = Histogram(
    "testpulse_store_write_seconds", "Time of one group-commit transaction of detections.", buckets=LATENCY_BUCKETS
)
STORE_BATCH_SIZE = Histogram(
    "testpulse_store_batch_size",
    "Detections committed per store transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
RETENTION_PRUNED = Counter(
    "testpulse_retention_pruned_detections_total",
    "Detections this node deleted because their session stopped more than TESTPULSE_RETENTION_DAYS ago.",
)
WRITE_QUEUE_DEPTH = Gauge("testpulse_write_queue_depth", "Detections waiting for their store transaction now.")
WRITE_QUEUE_REJECTED = Counter(
    "testpulse_write_queue_rejected_total", "Publishes refused with `unavailable` because the store queue was full."
)
DELIVERY_LAG_SECONDS = Histogram(
    "testpulse_delivery_lag_seconds", "From a detection's store time to its emit on this node.", buckets=LATENCY_BUCKETS
)
REPLAYED = Counter("testpulse_replayed_detections_total", "Detections replayed to joining clients from the store.")
GAP_FILLS = Counter(
    "testpulse_gap_fills_total", "Detections delivered from the store because their live announcement was late or lost."
)
RATE_LIMITED = Counter("testpulse_rate_limited_total", "Events or handshakes refused with `rate_limited`.", ["kind"])
SLOW_CONSUMERS = Counter(
    "testpulse_slow_consumer_disconnects_total", "Clients disconnected because their outgoing queue overflowed."
)
SERVER_DISCONNECTS = Counter(
    "testpulse_server_disconnects_total",
    "Connections this node ended, by reason (PROTOCOL.md 1.1: draining and slow_consumer reconnect by themselves).",
    ["reason"],
)
WRITE_TIMEOUTS = Counter(
    "testpulse_write_timeouts_total",
    "WebSocket connections aborted because the peer took nothing for TESTPULSE_WRITE_TIMEOUT_SECONDS.",
)
ROOMS = Gauge("testpulse_rooms", "Session rooms with at least one member on this node.")
ROOM_MEMBERS = Gauge("testpulse_room_members", "Session memberships (client x session) on this node.")
SESSIONS_BY_STATUS = Gauge(
    "testpulse_sessions", "Test sessions in the store by status (cluster-wide, read by every node).", ["status"]
)
EVENT_LOOP_LAG_SECONDS = Gauge(
    "testpulse_event_loop_lag_seconds", "How late this node's event loop ran a timer, sampled every second."
)
NODE_DRAINING = Gauge("testpulse_node_draining", "1 while this node drains before shutting down, else 0.")
REDIS_PUBLISHED = Counter("testpulse_redis_published_total", "Cross-node messages published to Redis.")
REDIS_PUBLISH_FAILURES = Counter(
    "testpulse_redis_publish_failures_total", "Cross-node messages that could not be published to Redis."
)
REDIS_RECONNECTS = Counter("testpulse_redis_reconnects_total", "Times this node re-established its Redis subscription.")
REDIS_PROBE_AGE_SECONDS = Gauge(
    "testpulse_redis_probe_age_seconds", "Seconds since this node's subscription last received its own probe."
)
REDIS_CHANNELS = Gauge(
    "testpulse_redis_channels",
    "Session channels this node needs (wanted) and has confirmed on its current Redis subscription (confirmed).",
    ["state"],
)
# Redis Cluster only (server/bus/cluster.py): one series per master this node holds a pub/sub
# connection to, named host:port (bounded by the masters' count), so that a deaf shard shows.
REDIS_SHARD_CHANNELS = Gauge(
    "testpulse_redis_shard_channels",
    "Redis Cluster: sharded channels this node needs on a master (wanted) and has confirmed there (confirmed).",
    ["shard", "state"],
)
REDIS_SHARD_PROBE_AGE_SECONDS = Gauge(
    "testpulse_redis_shard_probe_age_seconds",
    "Redis Cluster: seconds since this node's connection to a master last received its own probe.",
    ["shard"],
)
REDIS_CHANNELS_MOVED = Counter(
    "testpulse_redis_channels_moved_total",
    "Redis Cluster: sharded channels Redis unsubscribed this node from because their slot moved"
    " (a migration or a failover); each is resubscribed on the new owner, then the feeds catch up.",
)
REDIS_MESSAGES_RECEIVED = Counter(
    "testpulse_redis_messages_received_total", "Cross-node messages received from Redis, by kind.", ["kind"]
)
PRESENCE_MEMBERS = Gauge(
    "testpulse_presence_members",
    "Presence members this node holds: distinct (session, sub) pairs of its joined connections, sampled.",
)
PRESENCE_UPDATES = Counter(
    "testpulse_presence_updates_total", "presence_update frames sent to opted-in clients (coalesced per session)."
)
TOKEN_REFRESHES = Counter(
    "testpulse_token_refreshes_total", "refresh_token requests, by outcome (ok or the error code).", ["outcome"]
)
TOKEN_EXPIRIES = Counter(
    "testpulse_token_expiries_total", "Connections ended because their token expired without a refresh."
)
TOKEN_EXPIRING_SENT = Counter("testpulse_token_expiring_sent_total", "token_expiring warnings sent (once per token).")
JWKS_REFRESHES = Counter(
    "testpulse_jwks_refreshes_total",
    "Fetches of the JWK Set (TESTPULSE_JWKS_URL) that succeeded, by trigger.",
    ["trigger"],
)
JWKS_REFRESH_FAILURES = Counter(
    "testpulse_jwks_refresh_failures_total",
    "Fetches of the JWK Set that failed (the keys fetched before stay in use), by trigger.",
    ["trigger"],
)
JWKS_LAST_SUCCESS = Gauge(
    "testpulse_jwks_last_success_timestamp_seconds",
    "Unix time of the last successful fetch of the JWK Set; 0 while none has succeeded.",
)
JWKS_KEYS = Gauge("testpulse_jwks_keys", "Keys (by kid) in the JWK Set this node holds now.")

DISCONNECT_REASONS = ("client_disconnect", "server_disconnect", "ping_timeout", "transport_close", "transport_error")
SERVER_DISCONNECT_REASONS = ("draining", "slow_consumer", "auth_expired", "forbidden", "auth_invalid")
REFUSAL_CODES = ("auth_missing", "auth_invalid", "auth_expired", "rate_limited", "server_draining", "unavailable")
REFRESH_OUTCOMES = (
    "ok",
    "auth_invalid",
    "auth_expired",
    "forbidden",
    "bad_request",
    "unauthorized",
    "rate_limited",
    "unavailable",
)
JWKS_TRIGGERS = ("schedule", "unknown_kid")


def initialize_series(events: list[str], outcomes: list[str]) -> None:
    """Create every bounded label combination at 0, so that dashboards and alert ratios have a
    series to read before the first refusal, error or reconnect happens."""
    for event in events:
        HANDLER_SECONDS.labels(event)
        for outcome in ("ok", *outcomes):
            EVENTS_RECEIVED.labels(event, outcome)
    for code in REFUSAL_CODES:
        CONNECT_REFUSED.labels(code)
    for reason in (*DISCONNECT_REASONS, "other"):
        DISCONNECTS.labels(reason)
    for reason in SERVER_DISCONNECT_REASONS:
        SERVER_DISCONNECTS.labels(reason)
    for state in ("wanted", "confirmed"):
        REDIS_CHANNELS.labels(state)
    for transport in ("polling", "websocket"):
        CONNECTED_CLIENTS.labels(transport)
    for kind in ("event", "handshake", "backpressure"):
        RATE_LIMITED.labels(kind)
    for outcome in REFRESH_OUTCOMES:
        TOKEN_REFRESHES.labels(outcome)
    for trigger in JWKS_TRIGGERS:
        JWKS_REFRESHES.labels(trigger)
        JWKS_REFRESH_FAILURES.labels(trigger)
    for event in (
        "connection_status",
        "test_session_update",
        "detection_event",
        "detection_batch",
        "error",
        "presence_update",
        "token_expiring",
    ):
        EVENTS_EMITTED.labels(event)
    for kind in (
        "detections",
        "status",
        "emit",
        "resync",
        "callback",
        "disconnect",
        "enter_room",
        "leave_room",
        "close_room",
        "presence",
        "other",
        "rejected",
        "repeat",
    ):
        REDIS_MESSAGES_RECEIVED.labels(kind)


class _Off:
    """Stands in for every metric when TESTPULSE_METRICS_ENABLED=false (to measure what metrics cost)."""

    def labels(self, *args: Any, **kwargs: Any) -> _Off:
        return self

    def inc(self, *args: Any) -> None: ...

    def dec(self, *args: Any) -> None: ...

    def set(self, *args: Any) -> None: ...

    def observe(self, *args: Any) -> None: ...


def _switch_off() -> None:
    for name, value in list(globals().items()):
        if isinstance(value, Counter | Gauge | Histogram):
            REGISTRY.unregister(value)
            globals()[name] = _Off()


def reference() -> str:
    """The metric list as a Markdown table (docs/metrics.md is this, kept in sync by a test)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for value in list(globals().values()):
        if isinstance(value, Counter | Gauge | Histogram):
            name = value._name + ("_total" if isinstance(value, Counter) else "")
            kind = type(value).__name__.lower()
            labels = ", ".join(f"`{label}`" for label in value._labelnames) or "-"
            rows.append(f"| `{name}` | {kind} | {labels} | {value._documentation} |")
    return "\n".join(rows) + "\n"


# Read here, not from Settings: other modules bind metric children when they are imported, before
# any Settings exists. Settings validates the same variable.
if os.environ.get("TESTPULSE_METRICS_ENABLED", "true").strip().lower() in ("0", "false", "no", "off"):
    _switch_off()
