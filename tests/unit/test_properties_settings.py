"""Properties of the URL parser (server/urls.py) and the settings parser (server/settings.py): any
string gives a parsed value or the parser's typed error (UrlError, SettingsError), never another
exception; what is accepted is usable (ports in range, finite numbers)."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from testpulse.settings import Settings, SettingsError
from testpulse.urls import (
    UrlError,
    normalise_database_url,
    normalise_redis_url,
    parse_cluster_url,
    parse_sentinel_url,
)

pytestmark = pytest.mark.unit

SCHEMES = ["redis", "rediss", "valkey", "unix", "redis+sentinel", "valkey+sentinel", "redis+cluster", "rediss+cluster"]
SCHEMES += ["postgresql", "postgres", "postgresql+asyncpg", "sqlite", "sqlite+aiosqlite", "http", ""]
pieces = st.sampled_from(["[", "]", "::1", ":", "@", ",", "/", "?", "%", "#", "0", "6379", "65536", "99999", "٣", "²"])
pieces |= st.sampled_from(["host", "user:pw@", "[::1]:26379", "mymaster", "/0", "?sslmode=require", "-1", ""])
hosts = st.lists(pieces | st.text(max_size=4), max_size=8).map("".join)
urls = st.tuples(st.sampled_from(SCHEMES), hosts).map(lambda t: f"{t[0]}://{t[1]}" if t[0] else t[1]) | st.text()


@given(url=urls)
@example("redis+cluster://h:٣٣")
@example("redis+cluster://h:²")
@example("redis+sentinel://h:²/mymaster")
@example("redis+sentinel://h:1/²/mymaster")
@example("redis+cluster://[::1:6379")
@example("redis+sentinel://[::1:26379/mymaster")
@example("redis+cluster://h:99999")
@example("redis+cluster://h:0")
def test_urls_parse_or_raise_url_error(url: str) -> None:
    for parse in (normalise_redis_url, normalise_database_url, parse_cluster_url, parse_sentinel_url):
        try:
            result = parse(url)
        except UrlError:
            continue
        for _, port in getattr(result, "seeds", ()) + getattr(result, "sentinels", ()):
            assert 1 <= port <= 65535, url


FLOATS = ["TESTPULSE_RATE_LIMIT_PER_SECOND", "TESTPULSE_JWT_LEEWAY_SECONDS", "TESTPULSE_PING_INTERVAL_SECONDS"]
FLOATS += ["TESTPULSE_RETENTION_DAYS", "TESTPULSE_GAP_FILL_DELAY_SECONDS"]
INTS = ["TESTPULSE_MAX_PAYLOAD_BYTES", "TESTPULSE_REPLAY_PAGE_SIZE", "TESTPULSE_RATE_LIMIT_BURST"]
OTHERS = ["TESTPULSE_REDIS_URL", "TESTPULSE_DATABASE_URL", "TESTPULSE_ENV", "TESTPULSE_TRANSPORT"]
OTHERS += ["TESTPULSE_ALLOWED_ORIGINS", "TESTPULSE_NODE_ID", "TESTPULSE_LOG_LEVEL", "TESTPULSE_MIGRATE_ON_START"]
raw_values = (
    st.text(max_size=12)
    | urls
    | st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-0", "0", "1", "1.5", "٣", "²", "1_0"])
)


@given(environ=st.dictionaries(st.sampled_from(FLOATS + INTS + OTHERS), raw_values, max_size=4))
@example({"TESTPULSE_RATE_LIMIT_PER_SECOND": "nan"})
@example({"TESTPULSE_JWT_LEEWAY_SECONDS": "inf"})
@example({"TESTPULSE_RETENTION_DAYS": "NaN"})
@example({"TESTPULSE_REDIS_URL": "redis+cluster://h:²"})
def test_settings_parse_or_raise_settings_error(environ: dict[str, str]) -> None:
    try:
        settings = Settings.from_env(environ)
    except SettingsError:
        return
    for name in FLOATS:
        value = getattr(settings, name.removeprefix("TESTPULSE_").lower())
        assert math.isfinite(value), (name, value)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e999"])
def test_float_settings_refuse_nan_and_infinity(raw: str) -> None:
    with pytest.raises(SettingsError, match="TESTPULSE_RATE_LIMIT_PER_SECOND"):
        Settings.from_env({"TESTPULSE_RATE_LIMIT_PER_SECOND": raw})
    with pytest.raises(SettingsError, match="TESTPULSE_RETENTION_DAYS"):
        Settings(retention_days=float(raw)).validate()
