"""An identity provider for tests: RSA, EC and Ed25519 signing keys, and their JWK Set served over
real HTTP on a free loopback port (a thread), which the test can rotate, stop and start again."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from support.processes import HOST, free_port

ISSUER = "https://idp.test.invalid/realms/testpulse"


@dataclass
class Signer:
    """One key pair of the provider: `jwk` is what it publishes, sign() what it hands out."""

    kid: str
    alg: str
    private: Any
    extra: dict[str, Any] = field(default_factory=dict)  # JWK members to publish besides the key

    @property
    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = {"RS": RSAAlgorithm, "ES": ECAlgorithm, "Ed": OKPAlgorithm}[self.alg[:2]]
        body: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)
        published = {**body, "kid": self.kid, "use": "sig", "alg": self.alg, **self.extra}
        return {k: v for k, v in published.items() if v is not None}  # an extra of None drops a member

    def sign(self, claims: dict[str, Any], *, alg: str | None = None, headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=alg or self.alg, headers={"kid": self.kid, **(headers or {})})


def rsa_signer(kid: str, alg: str = "RS256") -> Signer:
    return Signer(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_signer(kid: str, alg: str = "ES256") -> Signer:
    curve = ec.SECP384R1() if alg == "ES384" else ec.SECP256R1()
    return Signer(kid, alg, ec.generate_private_key(curve))


def ed_signer(kid: str) -> Signer:
    return Signer(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def signer_for(alg: str, kid: str | None = None) -> Signer:
    kid = kid or f"{alg.lower()}-key"
    if alg.startswith("RS"):
        return rsa_signer(kid, alg)
    if alg.startswith("ES"):
        return ec_signer(kid, alg)
    return ed_signer(kid)


def claims(**overrides: Any) -> dict[str, Any]:
    """A day-long admin token's claims; `...` drops a claim."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": "idp-user", "role": "admin", "iat": now, "exp": now + 86_400, "iss": ISSUER}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


class JwksServer:
    """The JWK Set at `url`. publish() replaces the keys; stop() and start() take the provider down
    and up on the same port; `requests` counts the fetches it answered."""

    def __init__(self, *keys: Signer | dict[str, Any], cache_control: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/.well-known/jwks.json"
        self.cache_control = cache_control
        self.requests = 0
        self._document = b""
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.publish(*keys)

    def publish(self, *keys: Signer | dict[str, Any]) -> None:
        body = {"keys": [key.jwk if isinstance(key, Signer) else key for key in keys]}
        self._document = json.dumps(body).encode()

    def serve_raw(self, document: bytes) -> None:
        self._document = document

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                body = owner._document
                with owner._changed:  # counted before the answer leaves, so a client that has it sees the count
                    owner.requests += 1
                    owner._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if owner.cache_control:
                    self.send_header("Cache-Control", owner.cache_control)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((HOST, self.port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="jwks-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            assert not self._thread.is_alive(), "the JWKS server thread did not stop"
            self._server = self._thread = None

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.requests >= count, timeout):
                raise TimeoutError(f"the JWK Set was fetched {self.requests} times, not {count}, within {timeout}s")


@contextlib.contextmanager
def jwks_server(*keys: Signer | dict[str, Any], cache_control: str | None = None) -> Iterator[JwksServer]:
    server = JwksServer(*keys, cache_control=cache_control)
    server.start()
    try:
        yield server
    finally:
        server.stop()
