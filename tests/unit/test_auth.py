"""Tokens and permissions at the unit level: which JWTs become a Principal and what each role may do."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from testpulse.domain.auth import Action, AuthError, Principal, Role, TokenVerifier, issue_token, parse_ttl
from testpulse.domain.keyring import Fetched, Keyring
from testpulse.domain.protocol import ErrorCode, ProtocolError
from testpulse.settings import Settings

pytestmark = pytest.mark.unit

SECRET = "unit-test-secret-" + "0123456789abcdef" * 4  # long enough for HS512
SETTINGS = Settings(jwt_secret=SECRET)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"sub": "alice", "role": "viewer", "iat": now, "exp": now + 300}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def sign(body: dict[str, Any], *, key: str = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def unsigned(body: dict[str, Any]) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(body)}."


async def refusal(token: object, settings: Settings = SETTINGS) -> str:
    with pytest.raises(AuthError) as caught:
        await TokenVerifier(settings).verify(token)
    assert caught.value.message
    return caught.value.code


async def test_unicode_subject_is_accepted() -> None:
    assert (await TokenVerifier(SETTINGS).verify(sign(claims(sub="zoë@例え.jp")))).sub == "zoë@例え.jp"


async def test_valid_token_becomes_a_principal() -> None:
    exp = int(time.time()) + 300
    principal = await TokenVerifier(SETTINGS).verify(sign(claims(role="operator", exp=exp, sessions=["a", "b"])))
    assert principal == Principal("alice", Role.OPERATOR, frozenset({"a", "b"}), float(exp))


async def test_token_without_sessions_claim_may_touch_every_session() -> None:
    principal = await TokenVerifier(SETTINGS).verify(sign(claims()))
    assert principal.sessions is None and principal.may_touch("anything")


@pytest.mark.parametrize("token", [None, ""], ids=["none", "empty"])
async def test_missing_token_is_auth_missing(token: object) -> None:
    assert await refusal(token) == "auth_missing"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        123,
        ["x"],
        {"token": "x"},
        "x" * 9000,
    ],
    ids=["garbage", "three-parts", "number", "list", "dict", "too-long"],
)
async def test_malformed_token_is_auth_invalid(token: object) -> None:
    assert await refusal(token) == "auth_invalid"


async def test_expired_token_is_auth_expired() -> None:
    assert await refusal(sign(claims(exp=int(time.time()) - 5))) == "auth_expired"


async def test_token_not_yet_valid_is_auth_invalid() -> None:
    assert await refusal(sign(claims(nbf=int(time.time()) + 60))) == "auth_invalid"


async def test_token_issued_in_the_future_is_auth_invalid() -> None:
    assert await refusal(sign(claims(iat=int(time.time()) + 600))) == "auth_invalid"


async def test_leeway_tolerates_small_clock_skew() -> None:
    lenient = Settings(jwt_secret=SECRET, jwt_leeway_seconds=30)
    await TokenVerifier(lenient).verify(sign(claims(exp=int(time.time()) - 5)))


async def test_alg_none_is_refused() -> None:
    assert await refusal(unsigned(claims())) == "auth_invalid"


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_algorithm_not_configured_is_refused(alg: str) -> None:
    assert await refusal(sign(claims(), alg=alg)) == "auth_invalid"


async def test_configured_algorithm_is_accepted() -> None:
    both = Settings(jwt_secret=SECRET, jwt_algorithms=("HS256", "HS512"))
    assert (await TokenVerifier(both).verify(sign(claims(), alg="HS512"))).sub == "alice"


async def test_bad_signature_is_auth_invalid() -> None:
    assert await refusal(sign(claims(), key="another-secret-" + "0123456789abcdef" * 4)) == "auth_invalid"


async def test_tampered_payload_is_auth_invalid() -> None:
    header, _, signature = sign(claims()).split(".")
    body = base64.urlsafe_b64encode(json.dumps(claims(role="admin")).encode()).rstrip(b"=").decode()
    assert await refusal(f"{header}.{body}.{signature}") == "auth_invalid"


@pytest.mark.parametrize("claim", ["sub", "role", "exp"])
async def test_missing_required_claim_is_auth_invalid(claim: str) -> None:
    assert await refusal(sign(claims(**{claim: ...}))) == "auth_invalid"


@pytest.mark.parametrize(
    "override",
    [
        {"role": "superuser"},
        {"role": 1},
        {"sub": ""},
        {"sub": 5},
        {"sub": "a\x00b"},
        {"sub": "\ud800"},
        {"sessions": "s1"},
        {"sessions": [1]},
    ],
    ids=[
        "unknown-role",
        "role-number",
        "empty-sub",
        "sub-number",
        "sub-with-nul",
        "sub-lone-surrogate",
        "sessions-string",
        "sessions-numbers",
    ],
)
async def test_claim_of_the_wrong_shape_is_auth_invalid(override: dict[str, Any]) -> None:
    assert await refusal(sign(claims(**override))) == "auth_invalid"


class NoKeys:
    """A JWK Set with no keys: a verifier given it reads every header first (the JWKS path)."""

    async def fetch(self) -> Fetched:
        return Fetched(b'{"keys": []}', None)


async def outcome(verifier: TokenVerifier, token: object) -> tuple[str, str] | Principal:
    try:
        return await verifier.verify(token)
    except AuthError as exc:
        return exc.code, exc.message


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        unsigned(claims()),
        sign(claims(), alg="HS512"),
        sign(claims(), key="another-secret-" + "0123456789abcdef" * 4),
        sign(claims(exp=int(time.time()) - 60)),
        sign(claims(role="superuser")),
        sign(claims(nbf=int(time.time()) + 600)),
        sign(claims()),
    ],
    ids=["garbage", "three-parts", "two-parts", "alg-none", "hs512", "bad-signature", "expired", "role", "nbf", "good"],
)
async def test_hmac_alone_skips_the_header_read_and_answers_as_the_header_first_path(token: str) -> None:
    # With HMAC only, the verifier leaves the `alg` check to PyJWT (no header read first); a
    # configured key set forces the header-first path. Both must answer every token alike.
    header_first = TokenVerifier(SETTINGS, Keyring(NoKeys(), refresh_seconds=300))
    assert await outcome(TokenVerifier(SETTINGS), token) == await outcome(header_first, token)


AUDIENCE_SETTINGS = Settings(jwt_secret=SECRET, jwt_audience="testpulse")


async def test_configured_audience_is_required() -> None:
    assert await refusal(sign(claims()), AUDIENCE_SETTINGS) == "auth_invalid"
    assert await refusal(sign(claims(aud="someone-else")), AUDIENCE_SETTINGS) == "auth_invalid"
    assert (await TokenVerifier(AUDIENCE_SETTINGS).verify(sign(claims(aud="testpulse")))).sub == "alice"


async def test_configured_issuer_is_required() -> None:
    issuer = Settings(jwt_secret=SECRET, jwt_issuer="https://idp.example")
    assert await refusal(sign(claims()), issuer) == "auth_invalid"
    assert await refusal(sign(claims(iss="https://evil.example")), issuer) == "auth_invalid"
    assert (await TokenVerifier(issuer).verify(sign(claims(iss="https://idp.example")))).sub == "alice"


@pytest.mark.parametrize("settings", [SETTINGS, AUDIENCE_SETTINGS], ids=["plain", "audience"])
async def test_issued_tokens_verify_with_the_same_settings(settings: Settings) -> None:
    token = issue_token(settings, role="detector", sub="cam-1", ttl_seconds=60, sessions=["s1"])
    principal = await TokenVerifier(settings).verify(token)
    assert (principal.sub, principal.role, principal.sessions) == ("cam-1", Role.DETECTOR, frozenset({"s1"}))


def test_issue_token_refuses_an_unknown_role() -> None:
    with pytest.raises(ValueError, match="role"):
        issue_token(SETTINGS, role="root", sub="x", ttl_seconds=60)


# ---- the role x action matrix ------------------------------------------------------------------

MAY = {
    Role.VIEWER: {Action.WATCH},
    Role.OPERATOR: {Action.WATCH, Action.CONTROL},
    Role.DETECTOR: {Action.WATCH, Action.PUBLISH},
    Role.ADMIN: {Action.WATCH, Action.CONTROL, Action.PUBLISH},
}


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
def test_each_role_may_do_exactly_what_the_contract_grants(role: Role, action: Action) -> None:
    principal = Principal("u", role, None, time.time() + 60)
    if action in MAY[role]:
        principal.require(action, "any-session")
    else:
        with pytest.raises(ProtocolError) as caught:
            principal.require(action, "any-session")
        assert caught.value.code is ErrorCode.UNAUTHORIZED


@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
def test_sessions_claim_limits_which_sessions_the_token_may_touch(action: Action) -> None:
    principal = Principal("u", Role.ADMIN, frozenset({"mine"}), time.time() + 60)
    principal.require(action, "mine")
    with pytest.raises(ProtocolError) as caught:
        principal.require(action, "theirs")
    assert caught.value.code is ErrorCode.FORBIDDEN


def test_role_is_checked_before_the_session() -> None:
    principal = Principal("u", Role.VIEWER, frozenset({"mine"}), time.time() + 60)
    with pytest.raises(ProtocolError) as caught:
        principal.require(Action.CONTROL, "theirs")
    assert caught.value.code is ErrorCode.UNAUTHORIZED


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), ("2.5", 2.5)])
def test_ttl_accepts_units(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "-5m", "1y"])
def test_ttl_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="ttl"):
        parse_ttl(text)
