"""The JWK Set fetched from TESTPULSE_JWKS_URL (`https://`, `http://` or a mounted `file://`), off the event loop."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from testpulse import __version__
from testpulse.domain.keyring import MAX_SET_BYTES, Fetched, KeySourceError

FETCH_TIMEOUT_SECONDS = 10.0
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\s*(?:,|$)", re.IGNORECASE)


def max_age(cache_control: str | None) -> float | None:
    """Seconds a response may be reused per its Cache-Control; 0 for no-cache/no-store; None if unsaid."""
    if not cache_control:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    found = _MAX_AGE.search(cache_control)
    return float(found.group(1)) if found else None


class UrlKeySource:
    """KeySource over urllib in a worker thread: the standard library, so no HTTP client is added
    to a node's dependencies; fetches are rare (minutes apart, or an unknown kid every 10 s)."""

    def __init__(self, url: str, timeout: float = FETCH_TIMEOUT_SECONDS) -> None:
        self.url = url
        self._timeout = timeout

    async def fetch(self) -> Fetched:
        return await asyncio.to_thread(self._fetch)

    def _fetch(self) -> Fetched:
        parts = urlsplit(self.url)
        if parts.scheme == "file":
            return self._read_file(Path(unquote(parts.path)))
        request = urllib.request.Request(
            self.url,
            headers={"Accept": "application/jwk-set+json, application/json", "User-Agent": f"testpulse/{__version__}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                body = response.read(MAX_SET_BYTES + 1)
                return Fetched(body, max_age(response.headers.get("Cache-Control")))
        except urllib.error.HTTPError as exc:
            raise KeySourceError(f"{_where(self.url)} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KeySourceError(f"{_where(self.url)} could not be reached: {reason}") from None

    def _read_file(self, path: Path) -> Fetched:
        try:
            with path.open("rb") as file:
                return Fetched(file.read(MAX_SET_BYTES + 1), None)
        except OSError as exc:
            raise KeySourceError(f"{path} could not be read: {exc.strerror or exc}") from None


def _where(url: str) -> str:
    """The URL without credentials or query (which may carry a key) for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
