"""The TestExecution page: the built shell and assets (server/web/, made by scripts/build-web) and their headers."""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

WEB = importlib.resources.files("testpulse") / "web"

CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".woff2": "font/woff2",
}

# Everything the page loads comes from the node that served it: no inline script or style, no
# third-party origin. `connect-src 'self'` covers the same-origin WebSocket (CSP Level 3).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Asset names carry a hash of their content, so a cached copy is never wrong; the shell names the
# current ones and is revalidated on every load, so a new build is picked up at once.
IMMUTABLE = "public, max-age=31536000, immutable"
NO_CACHE = "no-cache"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    gzipped: bytes
    content_type: str


def _load(data: bytes, content_type: str) -> StaticFile:
    # mtime=0: the same bytes every time, whatever the clock says.
    return StaticFile(data, gzip.compress(data, compresslevel=9, mtime=0), content_type)


class Page:
    """The page's files, read once at start-up into memory (tens of kilobytes): a request never
    touches the disk, and only names that the build produced can be asked for."""

    def __init__(self) -> None:
        self.assets: dict[str, StaticFile] = {}
        self.shell: StaticFile | None = None
        shell = WEB / "index.html"
        if shell.is_file():
            self.shell = _load(shell.read_bytes(), "text/html; charset=utf-8")
        folder = WEB / "assets"
        if folder.is_dir():
            for entry in folder.iterdir():
                suffix = "." + entry.name.rsplit(".", 1)[-1]
                if entry.is_file() and suffix in CONTENT_TYPES:
                    self.assets[entry.name] = _load(entry.read_bytes(), CONTENT_TYPES[suffix])

    async def html(self, request: Request) -> Response:
        if self.shell is None:
            return Response(
                "the page is not built: run ./scripts/build-web\n",
                status_code=404,
                media_type="text/plain",
                headers=SECURITY_HEADERS,
            )
        return _send(request, self.shell, NO_CACHE)

    async def asset(self, request: Request) -> Response:
        found = self.assets.get(request.path_params["name"])
        if found is None:
            return Response("not found\n", status_code=404, media_type="text/plain", headers=SECURITY_HEADERS)
        return _send(request, found, IMMUTABLE)


def _send(request: Request, file: StaticFile, cache: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(file.gzipped, media_type=file.content_type, headers=headers)
    return Response(file.body, media_type=file.content_type, headers=headers)
