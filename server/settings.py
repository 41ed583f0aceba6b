"""One validated Settings object, read once from TESTPULSE_* environment variables."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from testpulse.urls import UrlError, normalise_database_url, normalise_redis_url

DEV_JWT_SECRET = "testpulse-dev-secret-change-me-0123456789"
SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512")  # with TESTPULSE_JWT_SECRET
JWKS_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA")  # with TESTPULSE_JWKS_URL
JWKS_SCHEMES = ("https://", "http://", "file://")
TRANSPORTS = ("auto", "lean", "stock")  # server/transport/auto.py

T = TypeVar("T")


class SettingsError(ValueError):
    """A configuration value is missing, malformed or unsafe; the message names the variable."""


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    """Every knob of a node. Field docs become the configuration reference (see `testpulse config`)."""

    env: str = field(
        default="development", metadata={"doc": "`development` or `production`; production refuses unsafe values"}
    )
    jwt_secret: str = field(
        default=DEV_JWT_SECRET,
        metadata={
            "doc": "HMAC secret that signs and verifies tokens; when TESTPULSE_JWKS_URL is set and this is"
            " left at its default, no HMAC token is accepted"
        },
    )
    jwks_url: str | None = field(
        default=None,
        metadata={
            "doc": "`https://`, `http://` or `file://` URL of the identity provider's JWK Set: RS256, RS384,"
            " RS512, ES256, ES384 and EdDSA tokens are verified with the key named by their `kid`"
        },
    )
    jwks_refresh_seconds: float = field(
        default=300.0,
        metadata={
            "doc": "longest time between fetches of the JWK Set (a shorter Cache-Control max-age of its"
            " response wins, down to 10 s); a token with an unknown `kid` fetches it at once, at most"
            " every 10 s; while the provider is unreachable the keys fetched before stay in use"
        },
    )
    jwt_algorithms: tuple[str, ...] = field(
        default=("HS256",),
        metadata={
            "doc": "accepted HMAC algorithms (HS256, HS384, HS512), comma separated; tokens are signed with the first"
        },
    )
    cluster_secret: str | None = field(
        default=None,
        metadata={
            "doc": "key that signs the messages nodes exchange through Redis; unset: derived from"
            " TESTPULSE_JWT_SECRET. Set it (the same on every node) when only TESTPULSE_JWKS_URL verifies tokens"
        },
    )
    jwt_audience: str | None = field(default=None, metadata={"doc": "when set, tokens must carry this `aud`"})
    jwt_issuer: str | None = field(default=None, metadata={"doc": "when set, tokens must carry this `iss`"})
    jwt_leeway_seconds: float = field(default=0.0, metadata={"doc": "clock skew tolerated on `exp`, `nbf` and `iat`"})
    database_url: str = field(
        default="sqlite+aiosqlite:///./testpulse.db",
        metadata={
            "doc": "`postgresql://`, `postgres://` or `postgresql+asyncpg://...`; `sqlite:///path` or"
            " `sqlite+aiosqlite:///path` (relative to the working folder: `sqlite:///./x.db`)"
        },
    )
    migrate_on_start: str = field(
        default="auto",
        metadata={
            "doc": "`auto`, `true` or `false`: whether a node migrates an older database schema at start"
            " (`auto`: in development only; `testpulse cluster` sets `true`). An empty database is always"
            " set up; otherwise run `testpulse migrate`"
        },
    )
    database_pool_size: int = field(default=10, metadata={"doc": "connections per node (PostgreSQL)"})
    database_timeout_seconds: float = field(
        default=5.0, metadata={"doc": "longest wait for one database operation before `unavailable`"}
    )
    retention_days: float = field(
        default=0.0,
        metadata={
            "doc": "delete the detections of sessions stopped more than this many days ago (a background"
            " job, a small batch at a time, one node at a time; running, paused and recently stopped"
            " sessions are never touched); `0` keeps every detection"
        },
    )
    retention_batch_rows: int = field(default=1000, metadata={"doc": "most detections one retention step deletes"})
    retention_pause_seconds: float = field(
        default=1.0, metadata={"doc": "pause between retention steps while there is more to delete"}
    )
    retention_check_seconds: float = field(
        default=3600.0, metadata={"doc": "how often retention looks again once nothing is left to delete"}
    )
    redis_url: str | None = field(
        default=None,
        metadata={
            "doc": "URL of the Redis that joins nodes into a cluster (`redis://`, `rediss://`, `unix://`,"
            " `valkey://`, `valkeys://`, `redis+sentinel://host:port,.../service`, `redis+cluster://host:port,...`);"
            " unset runs a single node"
        },
    )
    allowed_origins: tuple[str, ...] = field(
        default=("*",),
        metadata={"doc": "CORS/WebSocket origins allowed, comma separated (`*` for any, refused in production)"},
    )
    trusted_proxies: tuple[str, ...] = field(
        default=("127.0.0.1",),
        metadata={"doc": "addresses whose X-Forwarded-For is believed (the proxy), comma separated; `*` for any"},
    )
    max_payload_bytes: int = field(
        default=1_048_576, metadata={"doc": "largest Socket.IO message or HTTP body accepted"}
    )
    websocket_compression: bool = field(
        default=False,
        metadata={"doc": "permessage-deflate on WebSockets: less bandwidth for much more CPU and memory per client"},
    )
    transport: str = field(
        default="auto",
        metadata={
            "doc": "`auto`, `lean` or `stock`: the Engine.IO/WebSocket implementation. `lean` costs less per"
            " client but rests on library internals; `stock` is python-engineio's and uvicorn's own; `auto`"
            " runs lean when the installed libraries have what it needs, else stock with a warning"
        },
    )
    rate_limit_per_second: float = field(default=200.0, metadata={"doc": "sustained events per second per connection"})
    rate_limit_burst: int = field(
        default=400, metadata={"doc": "events a connection may send at once above the sustained rate"}
    )
    connect_rate_per_second: float = field(
        default=500.0, metadata={"doc": "handshakes per second a node accepts per client address"}
    )
    connect_rate_burst: int = field(default=1000, metadata={"doc": "handshake burst per client address"})
    replay_page_size: int = field(default=500, metadata={"doc": "detections read from the store per replay page"})
    write_batch_max: int = field(default=2000, metadata={"doc": "most detections committed in one store transaction"})
    write_queue_max: int = field(
        default=20_000, metadata={"doc": "detections waiting for the store before publishers get `unavailable`"}
    )
    client_queue_max: int = field(
        default=5000, metadata={"doc": "packets queued for one slow client before it is disconnected"}
    )
    gap_fill_delay_seconds: float = field(
        default=0.05, metadata={"doc": "wait for a missing seq to arrive before reading it from the store"}
    )
    token_check_leeway_seconds: float = field(
        default=1.0, metadata={"doc": "a connection is closed at most this long after its token expires"}
    )
    token_refresh_warning_seconds: float = field(
        default=60.0,
        metadata={"doc": "send `token_expiring` once per token this long before it expires (at once if less is left)"},
    )
    ping_interval_seconds: float = field(default=25.0, metadata={"doc": "Engine.IO ping interval"})
    ping_timeout_seconds: float = field(default=20.0, metadata={"doc": "Engine.IO ping timeout"})
    shutdown_timeout_seconds: float = field(default=10.0, metadata={"doc": "longest graceful shutdown"})
    write_timeout_seconds: float = field(
        default=30.0,
        metadata={"doc": "a WebSocket whose peer takes nothing for this long is aborted (it stopped reading)"},
    )
    node_id: str = field(
        default_factory=_default_node_id,
        metadata={"doc": "this node's name in `connection_status` and metrics (default host-pid)"},
    )
    metrics_enabled: bool = field(
        default=True, metadata={"doc": "serve Prometheus metrics; `false` only to measure what they cost"}
    )
    log_level: str = field(default="info", metadata={"doc": "log level: debug, info, warning, error"})

    def __post_init__(self) -> None:
        # Each URL is held in the one form the code uses, however the user wrote it; a form that
        # is not accepted stays as given, for validate() to refuse with the accepted ones listed.
        for name, normalise in (("database_url", normalise_database_url), ("redis_url", normalise_redis_url)):
            raw = getattr(self, name)
            if raw is not None:
                with contextlib.suppress(UrlError):
                    object.__setattr__(self, name, normalise(raw.strip()))

    @property
    def cluster_key_secret(self) -> str:
        return self.cluster_secret or self.jwt_secret

    @property
    def hmac_enabled(self) -> bool:
        """HMAC tokens are accepted unless a JWK Set is configured and no secret of one's own is."""
        return self.jwks_url is None or self.jwt_secret != DEV_JWT_SECRET

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def migrates_on_start(self) -> bool:
        return self.migrate_on_start == "true" or (self.migrate_on_start == "auto" and not self.production)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read TESTPULSE_* variables; explicit overrides (from CLI flags) win. Validates everything."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is not None and raw.strip() != "":
                values[f.name] = _PARSERS.get(f.name, _parser_for(f))(env_name(f.name), raw.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise SettingsError(f"{env_name(name)}: {why}")

        if self.migrate_on_start not in ("auto", "true", "false"):
            fail("migrate_on_start", f"must be 'auto', 'true' or 'false', got {self.migrate_on_start!r}")
        if self.transport not in TRANSPORTS:
            fail("transport", f"must be 'auto', 'lean' or 'stock', got {self.transport!r}")
        if self.env not in ("development", "production"):
            fail("env", f"must be 'development' or 'production', got {self.env!r}")
        if not self.jwt_algorithms:
            fail("jwt_algorithms", "at least one algorithm is required")
        for alg in self.jwt_algorithms:
            if alg not in SUPPORTED_ALGORITHMS:
                fail("jwt_algorithms", f"{alg!r} is not supported (use {', '.join(SUPPORTED_ALGORITHMS)})")
        if len(self.jwt_secret) < 32:
            fail("jwt_secret", "must be at least 32 characters")
        if self.cluster_secret is not None and len(self.cluster_secret) < 32:
            fail("cluster_secret", "must be at least 32 characters")
        if self.jwks_url is not None and not self.jwks_url.startswith(JWKS_SCHEMES):
            fail("jwks_url", f"must start with {', '.join(JWKS_SCHEMES)}, got {self.jwks_url!r}")
        for name, normalise in (("database_url", normalise_database_url), ("redis_url", normalise_redis_url)):
            if getattr(self, name) is not None:
                try:
                    normalise(getattr(self, name))
                except UrlError as exc:
                    fail(name, str(exc))
        in_memory = (":memory:", "mode=memory")
        if self.is_sqlite and (
            any(mark in self.database_url for mark in in_memory) or self.database_url.rstrip("/").endswith(":")
        ):
            # Each connection to an in-memory SQLite is a database of its own; a node has several.
            fail("database_url", "SQLite needs a file path, e.g. sqlite:///./testpulse.db")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f.name, f"must be a finite number, got {value!r}")
        positive = (
            "max_payload_bytes",
            "rate_limit_per_second",
            "rate_limit_burst",
            "connect_rate_per_second",
            "connect_rate_burst",
            "replay_page_size",
            "write_batch_max",
            "write_queue_max",
            "client_queue_max",
            "ping_interval_seconds",
            "ping_timeout_seconds",
            "database_pool_size",
            "database_timeout_seconds",
            "shutdown_timeout_seconds",
            "write_timeout_seconds",
            "retention_batch_rows",
            "retention_check_seconds",
            "jwks_refresh_seconds",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                fail(name, "must be greater than 0")
        for name in (
            "jwt_leeway_seconds",
            "gap_fill_delay_seconds",
            "token_check_leeway_seconds",
            "token_refresh_warning_seconds",
            "retention_days",
            "retention_pause_seconds",
        ):
            if getattr(self, name) < 0:
                fail(name, "must not be negative")
        if self.log_level not in ("debug", "info", "warning", "error"):
            fail("log_level", "must be one of debug, info, warning, error")
        if not self.node_id or len(self.node_id) > 64:
            fail("node_id", "must be 1 to 64 characters")
        if self.production:
            if self.hmac_enabled and self.jwt_secret == DEV_JWT_SECRET:
                fail("jwt_secret", "the development default is refused in production; set a secret of your own")
            if self.redis_url is not None and self.cluster_key_secret == DEV_JWT_SECRET:
                # Only a key set verifies tokens, so no secret of one's own keys the cross-node messages.
                fail("cluster_secret", "a cluster on Redis needs it in production when no TESTPULSE_JWT_SECRET is set")
            if not self.allowed_origins:
                fail("allowed_origins", "an empty origin list is refused in production")
            if "*" in self.allowed_origins:
                fail("allowed_origins", "'*' is refused in production; list the dashboard origins")


def env_name(field_name: str) -> str:
    return "TESTPULSE_" + field_name.upper()


def _number(kind: Callable[[str], T]) -> Callable[[str, str], T]:
    def parse(name: str, raw: str) -> T:
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected {kind.__name__}, got {raw!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{name}: expected a finite number, got {raw!r}")
        return value

    return parse


def _csv(name: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _boolean(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")


def _text(name: str, raw: str) -> str:
    return raw


def _parser_for(f: dataclasses.Field[Any]) -> Callable[[str, str], Any]:
    annotation = str(f.type)
    if annotation.startswith("tuple"):
        return _csv
    if annotation == "bool":
        return _boolean
    if annotation == "int":
        return _number(int)
    if annotation == "float":
        return _number(float)
    return _text


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "env": lambda name, raw: raw.lower(),
    "migrate_on_start": lambda name, raw: raw.lower(),
    "transport": lambda name, raw: raw.lower(),
}
