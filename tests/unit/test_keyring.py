"""The identity provider's keys: a real JWK Set over loopback HTTP, picked by kid, rotated, refreshed on
schedule, kept while the provider is down; and every token that must be refused, refused for its reason."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import REGISTRY
from support.jwks import ISSUER, JwksServer, Signer, claims, ec_signer, ed_signer, jwks_server, rsa_signer, signer_for

from testpulse.domain.auth import AuthError, TokenVerifier
from testpulse.domain.keyring import Keyring, KeysUnavailable
from testpulse.jwks import UrlKeySource, max_age
from testpulse.settings import DEV_JWT_SECRET, Settings, SettingsError

pytestmark = pytest.mark.unit

SECRET = "unit-test-secret-" + "x" * 40
ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keyring(server: JwksServer, clock: Clock | None = None, refresh: float = 300.0) -> Keyring:
    return Keyring(UrlKeySource(server.url, timeout=2.0), refresh_seconds=refresh, clock=clock or Clock())


def verifier(ring: Keyring, **settings: Any) -> TokenVerifier:
    return TokenVerifier(Settings(jwks_url="http://unused.invalid/jwks", **settings), ring)


async def refusal(v: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        await v.verify(token)
    assert caught.value.message
    return caught.value.code


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def forged(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"


# ---- what is accepted -------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS)
async def test_each_provider_algorithm_verifies_with_the_key_its_kid_names(alg: str) -> None:
    signer, other = signer_for(alg), rsa_signer("decoy")
    with jwks_server(other, signer) as server:
        principal = await verifier(keyring(server)).verify(signer.sign(claims(sub=f"user-{alg}")))
    assert principal.sub == f"user-{alg}"


async def test_keys_are_parsed_once_and_reused_while_their_jwk_is_unchanged() -> None:
    signer = rsa_signer("stable")
    with jwks_server(signer) as server:
        ring = keyring(server)
        await ring.refresh()
        first = await ring.key_for("stable")
        await ring.refresh()
        assert (await ring.key_for("stable")).key is first.key
        server.publish(rsa_signer("stable"))  # the same kid, a new key: parsed again
        await ring.refresh()
        assert (await ring.key_for("stable")).key is not first.key


async def test_hmac_keeps_working_beside_the_key_set_when_a_secret_is_set() -> None:
    signer = ec_signer("ec")
    with jwks_server(signer) as server:
        both = verifier(keyring(server), jwt_secret=SECRET)
        assert (await both.verify(jwt.encode(claims(), SECRET, algorithm="HS256"))).sub == "idp-user"
        assert (await both.verify(signer.sign(claims()))).sub == "idp-user"


async def test_a_mounted_key_set_file_is_read(tmp_path: Path) -> None:
    signer = ed_signer("file-key")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [signer.jwk]}))
    ring = Keyring(UrlKeySource(path.as_uri()), refresh_seconds=300)
    assert (await verifier(ring).verify(signer.sign(claims()))).sub == "idp-user"


# ---- rotation and schedule ----------------------------------------------------------------------


async def test_a_key_rotated_in_at_the_provider_is_accepted_on_its_first_token() -> None:
    old, new = rsa_signer("2026-old"), rsa_signer("2026-new")
    clock = Clock()
    with jwks_server(old) as server:
        ring = keyring(server, clock)
        v = verifier(ring)
        await v.verify(old.sign(claims()))
        server.publish(old, new)
        assert (await v.verify(new.sign(claims(sub="rotated")))).sub == "rotated"
        assert server.requests == 2


async def test_an_unknown_kid_fetches_the_set_at_most_once_per_ten_seconds() -> None:
    known, stranger = rsa_signer("known"), rsa_signer("stranger")
    clock = Clock()
    with jwks_server(known) as server:
        ring = keyring(server, clock)
        v = verifier(ring)
        await ring.refresh()
        assert await refusal(v, stranger.sign(claims())) == "auth_invalid"
        assert server.requests == 2  # the first unknown kid fetched once more
        server.publish(known, stranger)
        clock.now += 9.9
        assert await refusal(v, stranger.sign(claims())) == "auth_invalid"
        assert server.requests == 2  # within 10 s: no fetch, still refused
        clock.now += 0.1
        assert (await v.verify(stranger.sign(claims()))).sub == "idp-user"
        assert server.requests == 3


async def test_concurrent_unknown_kids_share_one_fetch() -> None:
    signer = ec_signer("late")
    with jwks_server() as server:
        ring = keyring(server)
        await ring.refresh()
        server.publish(signer)
        v = verifier(ring)
        results = await asyncio.gather(*(v.verify(signer.sign(claims(sub=f"u{i}"))) for i in range(8)))
        assert sorted(p.sub for p in results) == sorted(f"u{i}" for i in range(8))
        assert server.requests == 2


@pytest.mark.parametrize(
    ("cache_control", "refresh", "due"),
    [
        (None, 300.0, 300.0),
        ("public, max-age=60", 300.0, 60.0),
        ("max-age=3600", 300.0, 300.0),
        ("max-age=0", 300.0, 10.0),
        ("no-store", 300.0, 10.0),
        (None, 30.0, 30.0),
    ],
)
async def test_the_next_fetch_follows_max_age_within_the_refresh_setting(
    cache_control: str | None, refresh: float, due: float
) -> None:
    clock = Clock()
    with jwks_server(rsa_signer("k"), cache_control=cache_control) as server:
        ring = keyring(server, clock, refresh=refresh)
        assert ring.due_in() == 0
        assert await ring.refresh()
        assert ring.due_in() == pytest.approx(due)


def test_cache_control_parsing() -> None:
    assert max_age(None) is None
    assert max_age("public") is None
    assert max_age("public, max-age=120, must-revalidate") == 120
    assert max_age('max-age="15"') == 15
    assert max_age("s-maxage=5") is None
    assert max_age("no-cache") == 0


async def test_the_schedule_fetches_again_when_due() -> None:
    old, new = rsa_signer("sched-old"), rsa_signer("sched-new")
    with jwks_server(old, cache_control="max-age=0") as server:
        ring = Keyring(
            UrlKeySource(server.url), refresh_seconds=300, min_refresh_seconds=0.05, unknown_kid_interval=3600
        )
        task = asyncio.create_task(ring.run_forever())
        try:
            await asyncio.to_thread(server.wait_for_requests, 1)
            await ring.key_for("sched-old")  # the unknown-kid fetch is used up now
            server.publish(new)
            await asyncio.to_thread(server.wait_for_requests, server.requests + 2)
            assert (await ring.key_for("sched-new")).kid == "sched-new"
        finally:
            task.cancel()


# ---- the provider down --------------------------------------------------------------------------


async def test_while_the_provider_is_down_the_keys_fetched_before_stay_in_use(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signer = rsa_signer("cached")
    clock = Clock()
    failures = sample("testpulse_jwks_refresh_failures_total", trigger="schedule")
    with jwks_server(signer) as server:
        ring = keyring(server, clock)
        assert await ring.refresh()
        last_success = sample("testpulse_jwks_last_success_timestamp_seconds")
        assert last_success == pytest.approx(time.time(), abs=5)
        server.stop()
        with caplog.at_level(logging.WARNING, logger="testpulse.jwks"):
            assert not await ring.refresh()
        assert "JWK Set fetch failed" in caplog.text and "keeping the 1 keys" in caplog.text
        assert sample("testpulse_jwks_refresh_failures_total", trigger="schedule") == failures + 1
        assert sample("testpulse_jwks_last_success_timestamp_seconds") == last_success
        assert ring.due_in() == pytest.approx(10.0)  # tried again sooner than the schedule
        assert (await verifier(ring).verify(signer.sign(claims()))).sub == "idp-user"
        server.start()
        assert await ring.refresh()


async def test_a_node_that_never_fetched_the_keys_answers_unavailable_not_auth_invalid() -> None:
    signer = ec_signer("never")
    server = JwksServer(signer)  # never started: nothing listens on its port
    ring = keyring(server)
    v = verifier(ring)
    with pytest.raises(AuthError) as caught:
        await v.verify(signer.sign(claims()))
    assert caught.value.code == "unavailable"
    with pytest.raises(KeysUnavailable):
        await ring.key_for("never")
    server.start()
    try:
        assert await refusal(v, signer.sign(claims())) == "unavailable"  # within 10 s of the last try
        assert await ring.refresh()
        assert (await v.verify(signer.sign(claims()))).sub == "idp-user"
    finally:
        server.stop()


@pytest.mark.parametrize(
    "document", [b"not json", b'{"no": "keys"}', b'["keys"]'], ids=["not-json", "no-keys", "not-object"]
)
async def test_a_malformed_key_set_keeps_the_keys_held_before(document: bytes) -> None:
    signer = rsa_signer("good")
    with jwks_server(signer) as server:
        ring = keyring(server)
        assert await ring.refresh()
        server.serve_raw(document)
        assert not await ring.refresh()
        assert (await ring.key_for("good")).key is not None


# ---- the refusal matrix -------------------------------------------------------------------------

RSA = rsa_signer("rsa")
EC256 = ec_signer("ec256")
EC384 = ec_signer("ec384", "ES384")
ED = ed_signer("ed")
ENC = Signer("enc", "RS256", RSA.private, extra={"use": "enc"})
RS512_ONLY = Signer("rs512-only", "RS512", RSA.private)
# Keys published without `alg` or `use`: only their key type says what they may verify.
BARE = {"alg": None, "use": None}
NO_ALG = Signer("no-alg", "RS256", RSA.private, extra=BARE)
EC256_BARE = Signer("ec256-bare", "ES256", EC256.private, extra=BARE)
EC384_BARE = Signer("ec384-bare", "ES384", EC384.private, extra=BARE)
ED_BARE = Signer("ed-bare", "EdDSA", ED.private, extra=BARE)
PUBLIC_PEM = RSA.private.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
AUDIENCE = "testpulse"


def good(**overrides: Any) -> dict[str, Any]:
    """Claims that pass every check but the one a case is about."""
    return claims(**{"aud": AUDIENCE, **overrides})


def _wrong_key_type(alg: str, kid: str) -> str:
    """A token that says `alg`, signed by a key of its own type, naming a key of another type (or curve)."""
    return signer_for(alg, kid).sign(good())


def _private_jwk() -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA.private))
    return {**jwk, "kid": "private", "use": "sig", "alg": "RS256"}


NOT_ACCEPTED = "algorithm is not accepted"
BAD_SIGNATURE = "Signature verification failed"
# case -> (token maker, code, what the message says)
REFUSED: dict[str, tuple[Any, str, str]] = {
    "alg-none": (lambda: forged({"alg": "none", "kid": "rsa"}, good()), "auth_invalid", NOT_ACCEPTED),
    "alg-none-capitalised": (lambda: forged({"alg": "None", "kid": "rsa"}, good()), "auth_invalid", NOT_ACCEPTED),
    # Algorithm confusion: HS256 keyed with the provider's public key, which anyone can fetch. With
    # a secret configured it is checked against that secret (and fails), never against the JWK.
    "hs256-with-the-public-key": (
        lambda: forged_hmac(PUBLIC_PEM, {"alg": "HS256", "kid": "rsa"}),
        "auth_invalid",
        f"{NOT_ACCEPTED}|{BAD_SIGNATURE}",
    ),
    "hs256-with-the-jwk-json": (
        lambda: forged_hmac(json.dumps(RSA.jwk).encode(), {"alg": "HS256", "kid": "rsa"}),
        "auth_invalid",
        f"{NOT_ACCEPTED}|{BAD_SIGNATURE}",
    ),
    "hs256-with-the-dev-secret": (
        lambda: jwt.encode(good(), DEV_JWT_SECRET, algorithm="HS256"),
        "auth_invalid",
        f"{NOT_ACCEPTED}|{BAD_SIGNATURE}",
    ),
    "unsupported-ps256": (lambda: RSA.sign(good(), alg="PS256"), "auth_invalid", NOT_ACCEPTED),
    "es512-not-accepted": (
        lambda: forged({"alg": "ES512", "kid": "ec256"}, good(), b"x" * 132),
        "auth_invalid",
        NOT_ACCEPTED,
    ),
    "rs256-naming-an-ec-key": (lambda: _wrong_key_type("RS256", "ec256-bare"), "auth_invalid", "cannot verify RS256"),
    "es256-naming-an-rsa-key": (lambda: _wrong_key_type("ES256", "no-alg"), "auth_invalid", "cannot verify ES256"),
    "es256-naming-a-p384-key": (lambda: _wrong_key_type("ES256", "ec384-bare"), "auth_invalid", "cannot verify ES256"),
    "es384-naming-a-p256-key": (lambda: _wrong_key_type("ES384", "ec256-bare"), "auth_invalid", "cannot verify ES384"),
    "eddsa-naming-an-ec-key": (lambda: _wrong_key_type("EdDSA", "ec256-bare"), "auth_invalid", "cannot verify EdDSA"),
    "rs256-naming-an-okp-key": (lambda: _wrong_key_type("RS256", "ed-bare"), "auth_invalid", "cannot verify RS256"),
    "rs256-naming-an-es256-key": (lambda: _wrong_key_type("RS256", "ec256"), "auth_invalid", "is for ES256"),
    "key-for-encryption": (lambda: ENC.sign(good()), "auth_invalid", "for use 'enc'"),
    "key-alg-mismatch": (lambda: RS512_ONLY.sign(good(), alg="RS256"), "auth_invalid", "is for RS512"),
    "key-with-private-material": (
        lambda: Signer("private", "RS256", RSA.private).sign(good()),
        "auth_invalid",
        "private key material",
    ),
    "signed-by-another-key": (
        lambda: Signer("rsa", "RS256", rsa_signer("x").private).sign(good()),
        "auth_invalid",
        BAD_SIGNATURE,
    ),
    "unknown-kid": (lambda: rsa_signer("nobody-knows").sign(good()), "auth_invalid", "no key 'nobody-knows'"),
    "no-kid": (lambda: jwt.encode(good(), RSA.private, algorithm="RS256"), "auth_invalid", "no 'kid'"),
    "kid-not-a-string": (
        lambda: forged({"alg": "RS256", "kid": 7}, good(), b"x" * 256),
        "auth_invalid",
        "kid|Key ID",
    ),
    "expired": (lambda: RSA.sign(good(exp=int(time.time()) - 60)), "auth_expired", "expired"),
    "not-yet-valid": (lambda: EC256.sign(good(nbf=int(time.time()) + 3600)), "auth_invalid", "not valid yet"),
    "wrong-audience": (lambda: ED.sign(good(aud="someone-else")), "auth_invalid", "audience"),
    "no-audience": (lambda: ED.sign(good(aud=...)), "auth_invalid", "'aud'"),
    "wrong-issuer": (lambda: RSA.sign(good(iss="https://evil.example")), "auth_invalid", "issuer"),
    "missing-role": (lambda: EC384.sign(good(role=...)), "auth_invalid", "'role'"),
    "tampered-payload": (lambda: tampered(RSA.sign(good(role="viewer"))), "auth_invalid", BAD_SIGNATURE),
}


def forged_hmac(key: bytes, header: dict[str, Any]) -> str:
    # PyJWT itself refuses to HMAC-sign with a PEM public key: build the token by hand.
    import hashlib
    import hmac

    unsigned = forged(header, good()).rsplit(".", 1)[0]
    signature = hmac.new(key, unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def tampered(token: str) -> str:
    header, body, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    data["role"] = "admin"
    return ".".join([header, base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode(), signature])


def matrix_keys() -> list[Any]:
    return [RSA, EC256, EC384, ED, ENC, RS512_ONLY, NO_ALG, EC256_BARE, EC384_BARE, ED_BARE, _private_jwk()]


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
@pytest.mark.parametrize("hmac", [False, True], ids=["jwks-only", "jwks-and-hmac"])
async def test_refused_tokens_get_their_typed_refusal(case: str, hmac: bool) -> None:
    make, code, says = REFUSED[case]
    with jwks_server(*matrix_keys()) as server:
        ring = keyring(server)
        extra = {"jwt_secret": SECRET} if hmac else {}
        v = verifier(ring, jwt_audience=AUDIENCE, jwt_issuer=ISSUER, **extra)
        assert (await v.verify(RSA.sign(good()))).sub == "idp-user"  # everything else about the token is right
        with pytest.raises(AuthError) as caught:
            await v.verify(make())
        assert caught.value.code == code
        assert re.search(says, caught.value.message), caught.value.message


@pytest.mark.parametrize("signer", [NO_ALG, EC256_BARE, EC384_BARE, ED_BARE], ids=lambda s: s.kid)
async def test_a_key_published_without_alg_or_use_verifies_its_own_key_type(signer: Signer) -> None:
    with jwks_server(*matrix_keys()) as server:
        v = verifier(keyring(server))
        assert (await v.verify(signer.sign(claims()))).sub == "idp-user"


async def test_a_key_without_alg_or_use_serves_its_own_key_type() -> None:
    with jwks_server(NO_ALG) as server:
        v = verifier(keyring(server))
        assert (await v.verify(NO_ALG.sign(claims()))).sub == "idp-user"
        assert (await v.verify(NO_ALG.sign(claims(), alg="RS512"))).sub == "idp-user"


# ---- settings -----------------------------------------------------------------------------------


def test_hmac_is_off_with_only_a_key_set_and_on_otherwise() -> None:
    assert Settings().hmac_enabled  # the development default, as before
    assert not Settings(jwks_url="https://idp.example/jwks").hmac_enabled
    assert Settings(jwks_url="https://idp.example/jwks", jwt_secret=SECRET).hmac_enabled


@pytest.mark.parametrize("url", ["ftp://idp.example/jwks", "idp.example/jwks", "javascript:alert(1)"])
def test_a_key_set_url_must_be_https_http_or_file(url: str) -> None:
    with pytest.raises(SettingsError, match="TESTPULSE_JWKS_URL"):
        Settings.from_env({"TESTPULSE_JWKS_URL": url})


def test_production_with_only_a_key_set_needs_no_secret() -> None:
    env = {"TESTPULSE_ENV": "production", "TESTPULSE_ALLOWED_ORIGINS": "https://dash.example"}
    with pytest.raises(SettingsError, match="TESTPULSE_JWT_SECRET"):
        Settings.from_env(env)
    settings = Settings.from_env({**env, "TESTPULSE_JWKS_URL": "https://idp.example/jwks"})
    assert not settings.hmac_enabled
    assert settings.jwks_refresh_seconds == 300


def test_refresh_seconds_must_be_positive() -> None:
    with pytest.raises(SettingsError, match="TESTPULSE_JWKS_REFRESH_SECONDS"):
        Settings.from_env({"TESTPULSE_JWKS_REFRESH_SECONDS": "0"})


def test_a_production_cluster_with_only_a_key_set_needs_a_cluster_secret() -> None:
    env = {
        "TESTPULSE_ENV": "production",
        "TESTPULSE_ALLOWED_ORIGINS": "https://dash.example",
        "TESTPULSE_JWKS_URL": "https://idp.example/jwks",
        "TESTPULSE_REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    with pytest.raises(SettingsError, match="TESTPULSE_CLUSTER_SECRET"):
        Settings.from_env(env)
    settings = Settings.from_env({**env, "TESTPULSE_CLUSTER_SECRET": SECRET})
    assert settings.cluster_key_secret == SECRET and not settings.hmac_enabled
    assert Settings(jwt_secret=SECRET).cluster_key_secret == SECRET, "unset, it is the JWT secret as before"


def test_testpulse_token_refuses_to_mint_hmac_tokens_nobody_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from testpulse.cli import main

    monkeypatch.setenv("TESTPULSE_JWKS_URL", "https://idp.example/jwks")
    monkeypatch.delenv("TESTPULSE_JWT_SECRET", raising=False)
    assert main(["token", "--role", "viewer"]) == 2
    assert "TESTPULSE_JWKS_URL" in capsys.readouterr().err
    monkeypatch.setenv("TESTPULSE_JWT_SECRET", SECRET)
    assert main(["token", "--role", "viewer"]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["role"] == "viewer"
