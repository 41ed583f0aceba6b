"""The database and Redis URL forms users have, each turned into the one form the code uses.

Pure string work (no driver is imported), so Settings can normalise and refuse at start-up with a
message that lists what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

DATABASE_FORMS = (
    "postgresql://",
    "postgres://",
    "postgresql+asyncpg://",
    "sqlite:///path",
    "sqlite+aiosqlite:///path",
)
REDIS_FORMS = (
    "redis://",
    "rediss://",
    "unix://",
    "valkey://",
    "valkeys://",
    "redis+sentinel://",
    "valkey+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
    "valkey+cluster://",
    "valkeys+cluster://",
)
SENTINEL_SHAPE = "redis+sentinel://[[user]:password@]host:port[,host:port...]/[db/]service_name"
CLUSTER_SHAPE = "redis+cluster://[[user]:password@]host:port[,host:port...]"

_POSTGRES_SCHEMES = ("postgresql+asyncpg", "postgresql", "postgres")
_SQLITE_SCHEMES = ("sqlite+aiosqlite", "sqlite")
# valkey speaks the Redis protocol: the redis client serves it once the scheme says redis.
_REDIS_SCHEMES = {"redis": "redis", "rediss": "rediss", "unix": "unix", "valkey": "redis", "valkeys": "rediss"}
_SENTINEL_SCHEMES = ("redis+sentinel", "valkey+sentinel")
# A Redis Cluster's seed nodes; the `s` forms are TLS, as for `rediss://`.
_CLUSTER_SCHEMES = {
    "redis+cluster": "redis+cluster",
    "valkey+cluster": "redis+cluster",
    "rediss+cluster": "rediss+cluster",
    "valkeys+cluster": "rediss+cluster",
}


class UrlError(ValueError):
    """A URL in a form testpulse does not take; the message says which forms it does take."""


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _rest(url: str) -> str:
    return url.split("://", 1)[1]


def normalise_database_url(url: str) -> str:
    """`postgresql+asyncpg://...` or `sqlite+aiosqlite:///path`, the drivers the store runs on."""
    scheme = _scheme(url)
    if scheme in _POSTGRES_SCHEMES:
        return "postgresql+asyncpg://" + _asyncpg_query(_rest(url))
    if scheme in _SQLITE_SCHEMES:
        return "sqlite+aiosqlite://" + _rest(url)
    raise UrlError(f"{_shown(url)} is not a database URL testpulse takes; use one of {', '.join(DATABASE_FORMS)}")


def _asyncpg_query(rest: str) -> str:
    """libpq's `sslmode` (in the URLs hosting platforms hand out) is asyncpg's `ssl`, same values."""
    if "?" not in rest:
        return rest
    base, query = rest.split("?", 1)
    pairs = [("ssl" if key == "sslmode" else key, value) for key, value in parse_qsl(query, keep_blank_values=True)]
    return f"{base}?{urlencode(pairs)}"


def normalise_redis_url(url: str) -> str:
    """`redis://`, `rediss://`, `unix://`, `redis+sentinel://` or `redis(s)+cluster://`: valkey
    schemes become their redis twins."""
    scheme = _scheme(url)
    if scheme in _REDIS_SCHEMES:
        return f"{_REDIS_SCHEMES[scheme]}://{_rest(url)}"
    if scheme in _CLUSTER_SCHEMES:
        normal = f"{_CLUSTER_SCHEMES[scheme]}://{_rest(url)}"
        parse_cluster_url(normal)  # refuse a malformed one now, not at the first connection
        return normal
    if scheme in _SENTINEL_SCHEMES:
        normal = "redis+sentinel://" + _rest(url)
        parse_sentinel_url(normal)  # refuse a malformed one now, not at the first connection
        return normal
    raise UrlError(f"{_shown(url)} is not a Redis URL testpulse takes; use one of {', '.join(REDIS_FORMS)}")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """Where the Sentinels are, which master they watch, and how to log in to that master."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """python-socketio's form, `redis+sentinel://[:password@]host:port,.../db/service_name`; the
    db may be left out (`.../service_name`) or come after the service (`.../service_name/db`).
    Unlike python-socketio, which then falls back to its channel's name, the service is required:
    a Sentinel asked for a master it does not watch only answers "no such master"."""
    if _scheme(url) not in _SENTINEL_SCHEMES:
        raise UrlError(f"{_shown(url)} is not a Sentinel URL; the form is {SENTINEL_SHAPE}")
    parts = _split(url, SENTINEL_SHAPE)
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_address(host_port, "Sentinel address", SENTINEL_SHAPE) for host_port in hosts.split(",")]
    segments = [segment for segment in parts.path.split("/") if segment]
    numbers = [segment for segment in segments if _is_number(segment)]
    names = [segment for segment in segments if not _is_number(segment)]
    if len(names) != 1 or len(numbers) > 1:
        raise UrlError(f"{_shown(url)} must name one Sentinel service (the master's name): {SENTINEL_SHAPE}")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service_name=unquote(names[0]),
        db=int(numbers[0]) if numbers else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """A Redis Cluster's seed nodes (the client learns the others from them) and its login."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None


def is_cluster_url(url: str) -> bool:
    return _scheme(url) in _CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterTarget:
    """`redis+cluster://[[user]:password@]host:port[,host:port...]`. No database number: a Redis
    Cluster has only database 0, so a path is refused rather than silently ignored."""
    if not is_cluster_url(url):
        raise UrlError(f"{_shown(url)} is not a Redis Cluster URL; the form is {CLUSTER_SHAPE}")
    parts = _split(url, CLUSTER_SHAPE)
    if parts.path.strip("/") not in ("", "0") or parts.query:
        raise UrlError(f"{_shown(url)}: a Redis Cluster URL takes no database or options; the form is {CLUSTER_SHAPE}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = [_address(host_port, "Redis Cluster seed", CLUSTER_SHAPE) for host_port in hosts.split(",")]
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    return ClusterTarget(
        seeds=tuple(seeds),
        tls=_scheme(url).startswith(("rediss", "valkeys")),
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


def _split(url: str, shape: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": a bracket without its pair
        raise UrlError(f"{_shown(url)}: {exc}; the form is {shape}") from None


def _is_number(text: str) -> bool:
    # isascii: str.isdigit() also takes "²", which int() refuses, and other scripts' digits.
    return text.isascii() and text.isdigit()


def _address(host_port: str, what: str, shape: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, the port from 1 to 65535."""
    host, _, port = host_port.rpartition(":")
    if host.startswith("[") != host.endswith("]") or host in ("", "[]"):
        raise UrlError(f"{what} {host_port!r} needs host:port (an IPv6 host in brackets); the form is {shape}")
    if not _is_number(port) or not 1 <= int(port) <= 65535:
        raise UrlError(f"{what} {host_port!r} needs a port from 1 to 65535; the form is {shape}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _shown(url: str) -> str:
    """The URL without its password, for an error message that may end up in a log."""
    if "://" not in url or "@" not in url:
        return repr(url)
    scheme, rest = url.split("://", 1)
    credentials, _, location = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return repr(f"{scheme}://{user}:***@{location}" if ":" in credentials else url)
