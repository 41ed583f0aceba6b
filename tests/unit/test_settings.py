"""Settings: read once from TESTPULSE_* variables, refusing unsafe production values, naming the bad variable."""

from __future__ import annotations

import pytest

from testpulse.settings import DEV_JWT_SECRET, Settings, SettingsError

pytestmark = pytest.mark.unit

GOOD_SECRET = "production-secret-0123456789abcdefghijklmnop"
PRODUCTION = {
    "TESTPULSE_ENV": "production",
    "TESTPULSE_JWT_SECRET": GOOD_SECRET,
    "TESTPULSE_ALLOWED_ORIGINS": "https://dash.example",
}


def refused(environ: dict[str, str], variable: str) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(environ)
    assert str(caught.value).startswith(f"{variable}:"), f"{caught.value} does not name {variable}"
    return str(caught.value)


def test_defaults_are_a_valid_development_configuration() -> None:
    settings = Settings.from_env({})
    assert settings.env == "development" and not settings.production
    assert settings.jwt_algorithms == ("HS256",)
    assert settings.max_payload_bytes == 1_048_576


def test_production_with_own_secret_and_listed_origins_is_accepted() -> None:
    settings = Settings.from_env(PRODUCTION)
    assert settings.production
    assert settings.allowed_origins == ("https://dash.example",)


def test_production_refuses_the_default_secret() -> None:
    message = refused({**PRODUCTION, "TESTPULSE_JWT_SECRET": DEV_JWT_SECRET}, "TESTPULSE_JWT_SECRET")
    assert "production" in message


def test_production_refuses_any_origin() -> None:
    refused({**PRODUCTION, "TESTPULSE_ALLOWED_ORIGINS": "https://dash.example,*"}, "TESTPULSE_ALLOWED_ORIGINS")


def test_production_refuses_the_default_any_origin() -> None:
    environ = dict(PRODUCTION)
    del environ["TESTPULSE_ALLOWED_ORIGINS"]
    refused(environ, "TESTPULSE_ALLOWED_ORIGINS")


def test_production_refuses_an_empty_origin_list() -> None:
    refused({**PRODUCTION, "TESTPULSE_ALLOWED_ORIGINS": " , ,"}, "TESTPULSE_ALLOWED_ORIGINS")
    with pytest.raises(SettingsError, match=r"^TESTPULSE_ALLOWED_ORIGINS:"):
        Settings(env="production", jwt_secret=GOOD_SECRET, allowed_origins=()).validate()


def test_environment_name_is_case_insensitive_and_checked() -> None:
    assert Settings.from_env({**PRODUCTION, "TESTPULSE_ENV": "PRODUCTION"}).production
    refused({"TESTPULSE_ENV": "staging"}, "TESTPULSE_ENV")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TESTPULSE_MAX_PAYLOAD_BYTES", "lots"),
        ("TESTPULSE_MAX_PAYLOAD_BYTES", "0"),
        ("TESTPULSE_MAX_PAYLOAD_BYTES", "1.5"),
        ("TESTPULSE_RATE_LIMIT_PER_SECOND", "-1"),
        ("TESTPULSE_RATE_LIMIT_PER_SECOND", "fast"),
        ("TESTPULSE_RATE_LIMIT_BURST", "0"),
        ("TESTPULSE_DATABASE_POOL_SIZE", "0"),
        ("TESTPULSE_DATABASE_TIMEOUT_SECONDS", "0"),
        ("TESTPULSE_JWT_LEEWAY_SECONDS", "-1"),
        ("TESTPULSE_TOKEN_CHECK_LEEWAY_SECONDS", "-0.5"),
        ("TESTPULSE_JWT_SECRET", "too-short"),
        ("TESTPULSE_JWT_ALGORITHMS", "RS256"),
        ("TESTPULSE_JWT_ALGORITHMS", "none"),
        ("TESTPULSE_JWT_ALGORITHMS", ","),
        ("TESTPULSE_DATABASE_URL", "mysql://db/x"),
        ("TESTPULSE_DATABASE_URL", "sqlite+pysqlite:///sync-driver.db"),
        ("TESTPULSE_REDIS_URL", "http://localhost:6379"),
        ("TESTPULSE_LOG_LEVEL", "verbose"),
        ("TESTPULSE_NODE_ID", "n" * 65),
        ("TESTPULSE_RETENTION_DAYS", "-1"),
        ("TESTPULSE_RETENTION_DAYS", "forever"),
        ("TESTPULSE_RETENTION_BATCH_ROWS", "0"),
    ],
)
def test_bad_value_is_refused_naming_the_variable(variable: str, value: str) -> None:
    refused({variable: value}, variable)


def test_values_are_parsed_into_their_types() -> None:
    settings = Settings.from_env(
        {
            "TESTPULSE_MAX_PAYLOAD_BYTES": " 2048 ",
            "TESTPULSE_RATE_LIMIT_PER_SECOND": "12.5",
            "TESTPULSE_JWT_ALGORITHMS": "HS512, HS256",
            "TESTPULSE_ALLOWED_ORIGINS": "https://a.example, https://b.example",
            "TESTPULSE_JWT_AUDIENCE": "hub",
            "TESTPULSE_REDIS_URL": "redis://127.0.0.1:7000/0",
        }
    )
    assert settings.max_payload_bytes == 2048
    assert settings.rate_limit_per_second == 12.5
    assert settings.jwt_algorithms == ("HS512", "HS256")
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.jwt_audience == "hub"
    assert settings.redis_url == "redis://127.0.0.1:7000/0"


def test_retention_is_off_by_default_and_takes_days() -> None:
    assert Settings.from_env({}).retention_days == 0
    assert Settings.from_env({"TESTPULSE_RETENTION_DAYS": "90"}).retention_days == 90


def test_blank_variables_mean_the_default() -> None:
    blank = Settings.from_env({"TESTPULSE_MAX_PAYLOAD_BYTES": "  ", "TESTPULSE_JWT_AUDIENCE": ""})
    assert blank == Settings.from_env({})


def test_variables_of_other_programs_are_ignored() -> None:
    assert Settings.from_env({"MAX_PAYLOAD_BYTES": "oops", "TESTPULSE": "x"}).max_payload_bytes == 1_048_576


def test_explicit_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env({"TESTPULSE_NODE_ID": "from-env"}, node_id="from-flag")
    assert settings.node_id == "from-flag"


def test_overrides_are_validated_too() -> None:
    with pytest.raises(SettingsError, match=r"^TESTPULSE_NODE_ID:"):
        Settings.from_env({}, node_id="x" * 100)


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite://"])
def test_in_memory_sqlite_is_refused_naming_the_variable(url: str) -> None:
    # A node opens several connections; each would see an empty in-memory database of its own.
    refused({"TESTPULSE_DATABASE_URL": url}, "TESTPULSE_DATABASE_URL")


def test_transport_is_auto_by_default_and_takes_lean_or_stock_in_any_case() -> None:
    assert Settings.from_env({}).transport == "auto"
    assert Settings.from_env({"TESTPULSE_TRANSPORT": "Stock"}).transport == "stock"
    assert Settings.from_env({"TESTPULSE_TRANSPORT": "lean"}).transport == "lean"


def test_transport_refuses_anything_else() -> None:
    assert "'auto', 'lean' or 'stock'" in refused({"TESTPULSE_TRANSPORT": "fast"}, "TESTPULSE_TRANSPORT")
