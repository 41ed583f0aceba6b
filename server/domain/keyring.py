"""The identity provider's signing keys: a JWK Set held by `kid`, when to fetch it again, which key a token may use."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from testpulse import metrics

log = logging.getLogger("testpulse.jwks")

# Each algorithm with the one key type (and curves) it may be verified with: an RS256 token never
# meets an EC key, an ES256 token never a P-384 one, and no HMAC algorithm is here at all (a JWK
# Set's public key is no HMAC secret: that is the algorithm-confusion attack).
KEY_TYPES: dict[str, tuple[str, frozenset[str | None]]] = {
    "RS256": ("RSA", frozenset({None})),
    "RS384": ("RSA", frozenset({None})),
    "RS512": ("RSA", frozenset({None})),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
_PARSERS: dict[str, Callable[[str], Any]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}
UNKNOWN_KID_INTERVAL_SECONDS = 10.0  # a token with an unknown kid fetches the set at most this often
MIN_REFRESH_SECONDS = 10.0  # a provider's max-age=0 (or no-store) must not turn into a fetch per token
RETRY_SECONDS = 10.0  # the next try after a failed scheduled fetch (if sooner than the schedule)
MAX_SET_BYTES = 1_048_576


class KeySourceError(Exception):
    """The JWK Set could not be fetched or read; the message says why (no secrets in it)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes
    max_age: float | None  # Cache-Control max-age of the response, when it had one


class KeySource(Protocol):
    """Where the JWK Set document comes from (an HTTP(S) URL or a mounted file).

    fetch() never blocks the event loop and returns within a bounded time; any failure
    (unreachable, timeout, HTTP error status, a body over MAX_SET_BYTES) raises KeySourceError.
    """

    async def fetch(self) -> Fetched: ...


class KeysUnavailable(Exception):
    """No JWK Set has ever been fetched: a JWKS token cannot be judged (the contract's `unavailable`)."""


class KeyRefused(Exception):
    """The token's key is unknown or may not verify it; the message says which and why."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One JWK of the set, parsed once per distinct JWK (verification reuses the parsed key)."""

    kid: str
    kty: str
    crv: str | None
    alg: str | None
    use: str | None
    key: Any  # a cryptography public key, or None when the JWK cannot be used at all
    problem: str | None = None
    jwk: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def refusal(self, alg: str) -> str | None:
        """Why this key may not verify a token signed with `alg`, or None when it may."""
        if self.problem is not None:
            return f"key '{self.kid}' cannot be used: {self.problem}"
        if self.use is not None and self.use != "sig":
            return f"key '{self.kid}' is for use '{self.use}', not signatures"
        if self.alg is not None and self.alg != alg:
            return f"key '{self.kid}' is for {self.alg}, the token says {alg}"
        kty, curves = KEY_TYPES[alg]
        if self.kty != kty or self.crv not in curves:
            return f"key '{self.kid}' ({self.kty} {self.crv or ''}) cannot verify {alg}".replace(" )", ")")
        return None


def parse_key_set(body: bytes, previous: Mapping[str, SigningKey] | None = None) -> dict[str, SigningKey]:
    """The set's keys by kid. A JWK this code cannot use is kept, marked, so that a token naming it
    is refused for what it is rather than as unknown; a malformed document raises KeySourceError.
    A JWK unchanged since `previous` keeps its parsed key."""
    try:
        document = json.loads(body)
    except ValueError:
        raise KeySourceError("the JWK Set is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeySourceError("the JWK Set has no 'keys' list")
    keys: dict[str, SigningKey] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
            continue  # a token picks its key by kid: a key without one can never be chosen
        old = (previous or {}).get(jwk["kid"])
        keys[jwk["kid"]] = old if old is not None and old.jwk == jwk else _parse_key(jwk)
    return keys


def _parse_key(jwk: dict[str, Any]) -> SigningKey:
    kid, kty = jwk["kid"], jwk.get("kty")
    crv, alg, use = jwk.get("crv"), jwk.get("alg"), jwk.get("use")
    fields = {
        "kid": kid,
        "kty": str(kty),
        "crv": crv if isinstance(crv, str) else None,
        "alg": alg if isinstance(alg, str) else None,
        "use": use if isinstance(use, str) else None,
        "jwk": jwk,
    }
    parser = _PARSERS.get(str(kty))
    if parser is None:
        return SigningKey(**fields, key=None, problem=f"key type {kty!r} is not accepted")
    if "d" in jwk:
        return SigningKey(**fields, key=None, problem="it holds private key material")
    try:
        key = parser(json.dumps(jwk))
    except Exception as exc:  # noqa: BLE001 - PyJWT raises several types for a bad JWK
        return SigningKey(**fields, key=None, problem=f"unreadable ({type(exc).__name__})")
    return SigningKey(**fields, key=key)


class Keyring:
    """The JWK Set one node holds, fetched at start, again on schedule and on an unknown kid.

    Guarantees: a fetch that fails keeps the keys held before (counted and logged); at most one
    fetch runs at a time, callers that need one meanwhile wait for it; a token with an unknown kid
    fetches the set at most once per `unknown_kid_interval` seconds; until a fetch has succeeded
    once, key_for() raises KeysUnavailable.
    """

    def __init__(
        self,
        source: KeySource,
        *,
        refresh_seconds: float,
        unknown_kid_interval: float = UNKNOWN_KID_INTERVAL_SECONDS,
        min_refresh_seconds: float = MIN_REFRESH_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._refresh_seconds = refresh_seconds
        self._unknown_kid_interval = unknown_kid_interval
        self._min_refresh = min_refresh_seconds
        self._retry = retry_seconds
        self._clock = clock
        self._keys: dict[str, SigningKey] | None = None
        self._next_due = clock()
        self._last_unknown_kid_fetch: float | None = None
        self._last_missing_set_fetch: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._failing = False

    def due_in(self) -> float:
        """Seconds until the next scheduled fetch (0 when it is due)."""
        return max(0.0, self._next_due - self._clock())

    async def key_for(self, kid: object) -> SigningKey:
        """The key named `kid`, fetching the set once more if it is unknown (and the interval allows)."""
        if not isinstance(kid, str) or not kid:
            raise KeyRefused("token has no 'kid' header naming its key")
        if self._keys is not None and kid in self._keys:
            return self._keys[kid]
        # Two budgets, each one fetch per interval: a set never fetched yet (the provider was down
        # at start), and an unknown kid in a set held (a rotation, or someone inventing kids).
        # Fetching for the first does not use up the second, so the first token of a rotation
        # right after start is still accepted.
        now, missing = self._clock(), self._keys is None
        last = self._last_missing_set_fetch if missing else self._last_unknown_kid_fetch
        if self._fetching():
            assert self._inflight is not None
            await asyncio.shield(self._inflight)
        elif last is None or now - last >= self._unknown_kid_interval:
            if missing:
                self._last_missing_set_fetch = now
            else:
                self._last_unknown_kid_fetch = now
            await self.refresh("unknown_kid")
        if self._keys is None:
            raise KeysUnavailable("the identity provider's keys could not be fetched yet")
        if kid not in self._keys:
            raise KeyRefused(f"no key '{kid}' in the identity provider's key set")
        return self._keys[kid]

    async def refresh(self, trigger: str = "schedule") -> bool:
        """Fetch the set now (or join the fetch under way); True when the keys are fresh from it."""
        if not self._fetching() or self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch(trigger))
            self._inflight.add_done_callback(self._forget)
        return await asyncio.shield(self._inflight)

    def _fetching(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def _forget(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self, trigger: str) -> bool:
        try:
            fetched = await self._source.fetch()
            if len(fetched.body) > MAX_SET_BYTES:
                raise KeySourceError(f"the JWK Set is larger than {MAX_SET_BYTES} bytes")
            keys = parse_key_set(fetched.body, self._keys)
        except KeySourceError as exc:
            metrics.JWKS_REFRESH_FAILURES.labels(trigger).inc()
            held = f"keeping the {len(self._keys)} keys fetched before" if self._keys is not None else "no keys yet"
            log.warning("JWK Set fetch failed (%s): %s; %s", trigger, exc, held)
            self._failing = True
            if trigger == "schedule":
                self._next_due = self._clock() + min(self._retry, self._refresh_seconds)
            return False
        interval = self._refresh_seconds
        if fetched.max_age is not None:
            interval = min(interval, fetched.max_age)
        self._next_due = self._clock() + max(interval, self._min_refresh)
        if self._failing:
            log.info("JWK Set fetched again after failures: %d keys", len(keys))
        elif self._keys is None or set(keys) != set(self._keys):
            log.info("JWK Set fetched: %d keys (%s)", len(keys), ", ".join(sorted(keys)))
        self._failing = False
        self._keys = keys
        metrics.JWKS_REFRESHES.labels(trigger).inc()
        metrics.JWKS_LAST_SUCCESS.set(time.time())
        metrics.JWKS_KEYS.set(len(keys))
        return True

    async def run_forever(self) -> None:
        """Fetch at once, then whenever the schedule says (cancel to stop)."""
        while True:
            if self.due_in() <= 0:
                try:
                    await self.refresh("schedule")
                except Exception:  # the schedule must outlive a bug in one fetch
                    log.exception("JWK Set refresh failed unexpectedly; trying again in %.0f s", self._retry)
                    self._next_due = self._clock() + self._retry
            await asyncio.sleep(max(self.due_in(), 0.05))
