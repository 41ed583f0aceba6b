"""Database and Redis URLs as users have them: every accepted form normalised, any other refused."""

from __future__ import annotations

import pytest

from testpulse.settings import Settings, SettingsError
from testpulse.urls import (
    ClusterTarget,
    SentinelTarget,
    UrlError,
    normalise_redis_url,
    parse_cluster_url,
    parse_sentinel_url,
)

pytestmark = pytest.mark.unit


def refusal(variable: str, url: str) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: url})
    message = str(caught.value)
    assert message.startswith(f"{variable}:"), message
    return message


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://app:pw@db.example:5432/testpulse", "postgresql+asyncpg://app:pw@db.example:5432/testpulse"),
        ("postgres://app:pw@db.example/testpulse", "postgresql+asyncpg://app:pw@db.example/testpulse"),
        ("postgresql+asyncpg://app@db.example/testpulse", "postgresql+asyncpg://app@db.example/testpulse"),
        ("POSTGRES://app@db.example/testpulse", "postgresql+asyncpg://app@db.example/testpulse"),
        # libpq's sslmode (Heroku, Render, Neon...) is asyncpg's ssl.
        (
            "postgres://app@db.example/testpulse?sslmode=require&application_name=tp",
            "postgresql+asyncpg://app@db.example/testpulse?ssl=require&application_name=tp",
        ),
        ("sqlite:////var/lib/testpulse/x.db", "sqlite+aiosqlite:////var/lib/testpulse/x.db"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite+aiosqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("  sqlite:///./x.db  ", "sqlite+aiosqlite:///./x.db"),
    ],
)
def test_database_urls_in_every_accepted_form_become_the_drivers_form(given: str, used: str) -> None:
    settings = Settings.from_env({"TESTPULSE_DATABASE_URL": given})
    assert settings.database_url == used
    assert settings.is_sqlite == used.startswith("sqlite")


def test_urls_given_in_code_are_normalised_too() -> None:
    assert Settings(database_url="postgres://db.example/tp").database_url == "postgresql+asyncpg://db.example/tp"
    assert Settings(redis_url="valkey://cache:6379/0").redis_url == "redis://cache:6379/0"
    assert Settings.from_env({}, database_url="sqlite:///./y.db").database_url == "sqlite+aiosqlite:///./y.db"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app@db.example/testpulse",
        "postgresql+psycopg://app@db.example/testpulse",
        "sqlite+pysqlite:///./x.db",
        "db.example:5432/testpulse",
        "./testpulse.db",
    ],
)
def test_other_database_urls_are_refused_listing_the_accepted_forms(url: str) -> None:
    message = refusal("TESTPULSE_DATABASE_URL", url)
    for form in ("postgresql://", "postgres://", "postgresql+asyncpg://", "sqlite:///path", "sqlite+aiosqlite:///path"):
        assert form in message


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite:///", "sqlite:///x.db?mode=memory"])
def test_in_memory_sqlite_is_refused_in_the_plain_form_too(url: str) -> None:
    assert "file path" in refusal("TESTPULSE_DATABASE_URL", url)


def test_a_refused_url_does_not_show_its_password() -> None:
    message = refusal("TESTPULSE_DATABASE_URL", "mysql://app:hunter2@db.example/testpulse")
    assert "hunter2" not in message and "app:***@db.example" in message


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://:pw@cache.example:6380/1", "rediss://:pw@cache.example:6380/1"),
        ("unix:///run/redis/redis.sock?db=2", "unix:///run/redis/redis.sock?db=2"),
        ("valkey://cache.example:6379/0", "redis://cache.example:6379/0"),
        ("valkeys://cache.example:6380/0", "rediss://cache.example:6380/0"),
        ("redis+sentinel://s1:26379,s2:26379/0/mymaster", "redis+sentinel://s1:26379,s2:26379/0/mymaster"),
        ("valkey+sentinel://s1:26379/mymaster", "redis+sentinel://s1:26379/mymaster"),
    ],
)
def test_redis_urls_in_every_accepted_form_become_the_clients_form(given: str, used: str) -> None:
    assert Settings.from_env({"TESTPULSE_REDIS_URL": given}).redis_url == used


@pytest.mark.parametrize(
    "url",
    ["http://cache.example:6379", "memcached://cache.example", "cache.example:6379", "redis+shard://c1:7000"],
)
def test_other_redis_urls_are_refused_listing_the_accepted_forms(url: str) -> None:
    message = refusal("TESTPULSE_REDIS_URL", url)
    for form in ("redis://", "rediss://", "unix://", "valkey://", "redis+sentinel://"):
        assert form in message


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379/0",  # no service
        "redis+sentinel://s1:26379",
        "redis+sentinel://s1/mymaster",  # no port
        "redis+sentinel://s1:26379,:26380/mymaster",
        "redis+sentinel://s1:26379/mymaster/other",
        "redis+sentinel://s1:26379/0/1/mymaster",
    ],
)
def test_malformed_sentinel_urls_are_refused_at_start(url: str) -> None:
    assert "service_name" in refusal("TESTPULSE_REDIS_URL", url)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        # python-socketio's form: db, then service.
        (
            "redis+sentinel://:secret@10.0.0.1:26379,10.0.0.2:26380/2/mymaster",
            SentinelTarget((("10.0.0.1", 26379), ("10.0.0.2", 26380)), "mymaster", db=2, password="secret"),
        ),
        ("redis+sentinel://s1:26379/mymaster", SentinelTarget((("s1", 26379),), "mymaster")),
        ("redis+sentinel://s1:26379/mymaster/3", SentinelTarget((("s1", 26379),), "mymaster", db=3)),
        (
            "redis+sentinel://app:p%40ss@s1:26379/0/my%20master",
            SentinelTarget((("s1", 26379),), "my master", username="app", password="p@ss"),
        ),
        ("redis+sentinel://[::1]:26379/mymaster", SentinelTarget((("::1", 26379),), "mymaster")),
    ],
)
def test_sentinel_urls_name_the_sentinels_the_service_the_db_and_the_login(url: str, target: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == target


def test_a_plain_redis_url_is_not_a_sentinel_url() -> None:
    with pytest.raises(UrlError):
        parse_sentinel_url("redis://s1:26379/0")


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("redis+cluster://r1:7000", "redis+cluster://r1:7000"),
        ("valkey+cluster://r1:7000,r2:7001", "redis+cluster://r1:7000,r2:7001"),
        ("valkeys+cluster://u:p@r1:7000", "rediss+cluster://u:p@r1:7000"),
    ],
)
def test_redis_cluster_urls_normalise_to_the_redis_scheme(url: str, normal: str) -> None:
    assert normalise_redis_url(url) == normal


def test_a_redis_cluster_url_names_its_seed_nodes_login_and_tls() -> None:
    assert parse_cluster_url("rediss+cluster://user:s%40cret@r1:7000,[::1]:7001") == ClusterTarget(
        seeds=(("r1", 7000), ("::1", 7001)), tls=True, username="user", password="s@cret"
    )
    assert parse_cluster_url("redis+cluster://r1:7000/") == ClusterTarget(seeds=(("r1", 7000),))


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://r1",  # no port
        "redis+cluster://r1:7000,:7001",
        "redis+cluster://r1:7000/1",  # a cluster has database 0 only
        "redis+cluster://r1:7000?timeout=1",
    ],
)
def test_malformed_redis_cluster_urls_are_refused_with_the_form(url: str) -> None:
    with pytest.raises(UrlError, match="redis\\+cluster://"):
        normalise_redis_url(url)
