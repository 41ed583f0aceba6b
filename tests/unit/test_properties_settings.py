"""Properties of the URL parser (server/urls.py) and the settings parser (server/settings.py): any
string gives a parsed value or the parser's typed error (UrlError, SettingsError), never another
exception; what is accepted is usable (ports in range, finite numbers)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

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
