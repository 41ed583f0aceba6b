"""JWT -> Principal; the only place tokens are decoded or signed."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from testpulse.domain.keyring import KEY_TYPES, KeyRefused, Keyring, KeysUnavailable
from testpulse.domain.protocol import ErrorCode, ProtocolError
from testpulse.settings import Settings


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    DETECTOR = "detector"
    ADMIN = "admin"


class Action(enum.Enum):
    WATCH = "watch"
    CONTROL = "control"
    PUBLISH = "publish"


# A detector may watch what it publishes into; the contract only says which roles *may* act.
PERMISSIONS: dict[Role, frozenset[Action]] = {
    Role.VIEWER: frozenset({Action.WATCH}),
    Role.OPERATOR: frozenset({Action.WATCH, Action.CONTROL}),
    Role.DETECTOR: frozenset({Action.WATCH, Action.PUBLISH}),
    Role.ADMIN: frozenset(Action),
}


class AuthError(Exception):
    """A token was refused. `code` is one of the contract's connect_error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    role: Role
    sessions: frozenset[str] | None  # None: every session
    expires_at: float

    def require(self, action: Action, session_id: str | None = None) -> None:
        """Raise the contract's error unless this principal may do `action` (on `session_id`)."""
        if action not in PERMISSIONS[self.role]:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"role '{self.role}' may not {action.value} sessions")
        if session_id is not None and not self.may_touch(session_id):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"token may not touch session '{session_id}'")

    def may_touch(self, session_id: str) -> bool:
        return self.sessions is None or session_id in self.sessions


class TokenVerifier:
    """Verifies HMAC tokens with TESTPULSE_JWT_SECRET and, given a keyring, the identity provider's
    tokens with the JWK Set key their `kid` names. The header's `alg` chooses which, and only among
    the algorithms configured: an HMAC token is never checked against a JWKS key, nor the reverse."""

    def __init__(self, settings: Settings, keyring: Keyring | None = None) -> None:
        self._secret = settings.jwt_secret
        self._hmac = frozenset(settings.jwt_algorithms) if settings.hmac_enabled else frozenset()
        self._keyring = keyring
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        # With HMAC alone the header need not be read first: PyJWT refuses any other `alg` itself,
        # and reading it costs a quarter of a verification (every segment decoded twice), which a
        # connection storm pays once per client.
        self._hmac_only = sorted(self._hmac) if self._hmac and keyring is None else None

    async def verify(self, token: object) -> Principal:
        if token is None or token == "":
            raise AuthError("auth_missing", "no token: send auth={'token': ...} or an Authorization: Bearer header")
        if not isinstance(token, str) or len(token) > 8192:
            raise AuthError("auth_invalid", "token must be a JWT string")
        if self._hmac_only is not None:
            return _principal_from(self._decode(token, self._secret, self._hmac_only))
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError("auth_invalid", f"token is invalid: {exc}") from None
        alg = header.get("alg")
        key: object
        if isinstance(alg, str) and alg in self._hmac:
            key = self._secret
        elif isinstance(alg, str) and alg in KEY_TYPES and self._keyring is not None:
            key = await self._provider_key(header.get("kid"), alg)
        else:
            raise AuthError("auth_invalid", "token algorithm is not accepted")
        return _principal_from(self._decode(token, key, [alg]))

    async def _provider_key(self, kid: object, alg: str) -> object:
        assert self._keyring is not None
        try:
            found = await self._keyring.key_for(kid)
        except KeysUnavailable as exc:
            raise AuthError("unavailable", f"{exc}; retry shortly") from None
        except KeyRefused as exc:
            raise AuthError("auth_invalid", str(exc)) from None
        refusal = found.refusal(alg)
        if refusal is not None:
            raise AuthError("auth_invalid", refusal)
        return found.key

    def _decode(self, token: str, key: object, algorithms: list[str]) -> dict[str, object]:
        options = {"require": ["exp", "sub", "role"], "verify_aud": self._audience is not None}
        try:
            return jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("auth_expired", "token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("auth_invalid", "token is not valid yet (nbf/iat in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("auth_invalid", f"token lacks the required claim '{exc.claim}'") from None
        except jwt.InvalidAudienceError:
            raise AuthError("auth_invalid", "token audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("auth_invalid", "token issuer is not accepted") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("auth_invalid", "token algorithm is not accepted") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("auth_invalid", f"token is invalid: {exc}") from None


def _principal_from(claims: dict[str, object]) -> Principal:
    sub, role, exp = claims.get("sub"), claims.get("role"), claims.get("exp")
    if not isinstance(sub, str) or not sub:
        raise AuthError("auth_invalid", "claim 'sub' must be a non-empty string")
    if "\x00" in sub or not _encodable(sub):
        # The subject is written to the audit log as the actor: PostgreSQL text refuses NUL and
        # no database stores a lone surrogate, so such a token could only ever fail later.
        raise AuthError("auth_invalid", "claim 'sub' must be valid text without NUL characters")
    if not isinstance(role, str) or role not in Role.__members__.values():
        raise AuthError("auth_invalid", f"claim 'role' must be one of {', '.join(r.value for r in Role)}")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("auth_invalid", "claim 'exp' must be a number")
    sessions = claims.get("sessions")
    allowed: frozenset[str] | None = None
    if sessions is not None:
        if not isinstance(sessions, list) or not all(isinstance(s, str) for s in sessions):
            raise AuthError("auth_invalid", "claim 'sessions' must be a list of session ids")
        allowed = frozenset(sessions)
    return Principal(sub=sub, role=Role(role), sessions=allowed, expires_at=float(exp))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def issue_token(
    settings: Settings,
    *,
    role: str,
    sub: str,
    ttl_seconds: float,
    sessions: Iterable[str] | None = None,
    now: float | None = None,
) -> str:
    """Sign a token the way `testpulse token` and the tests obtain one (HMAC, TESTPULSE_JWT_SECRET)."""
    if role not in Role.__members__.values():
        raise ValueError(f"role must be one of {', '.join(r.value for r in Role)}")
    issued = time.time() if now is None else now
    claims: dict[str, object] = {"sub": sub, "role": role, "iat": int(issued), "exp": int(issued + ttl_seconds)}
    if sessions is not None:
        claims["sessions"] = list(sessions)
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret, algorithm=settings.jwt_algorithms[0])


def parse_ttl(text: str) -> float:
    """'90s', '15m', '1h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise ValueError(f"invalid ttl {text!r}: use e.g. 90s, 15m, 1h, 7d") from None
    if value <= 0:
        raise ValueError("ttl must be positive")
    return value
