"""The TestExecution page as it ships: server/web/ is what scripts/build-web makes from the lock
(a rebuild into a temp dir gives the same bytes), its first load stays within 200 KB gzip, and a
node serves it with the caching and security headers the page relies on."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from deploy_support import ROOT
from starlette.applications import Starlette
from starlette.routing import Route

from testpulse.http.page import Page

pytestmark = pytest.mark.deploy

WEB = ROOT / "server" / "web"
FIRST_LOAD_LIMIT_BYTES = 200 * 1024


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js: run ./scripts/setup")
def test_committed_build_is_what_the_build_script_makes_from_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "web"
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-web"), "--out", str(out)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert digests(out) == digests(WEB), "server/web/ is stale: run ./scripts/build-web and commit server/web/"


def first_load() -> list[Path]:
    """The shell and everything it names (the page loads nothing else before it is usable)."""
    shell = (WEB / "index.html").read_text()
    names = re.findall(r'(?:src|href)="/(assets/[^"]+)"', shell)
    assert names, "the shell names no assets"
    return [WEB / "index.html", *(WEB / name for name in names)]


def test_first_load_is_at_most_200_kb_gzip() -> None:
    total = sum(len(gzip.compress(path.read_bytes(), 9)) for path in first_load())
    assert total <= FIRST_LOAD_LIMIT_BYTES, f"first load is {total} bytes gzip"


def test_asset_names_carry_a_content_hash() -> None:
    for path in first_load()[1:]:
        assert re.fullmatch(r"[\w-]+-[\w-]{8}\.(js|css)", path.name), path.name


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    page = Page()
    routes = [
        Route("/", page.html),
        Route("/sessions/{session_id}", page.html),
        Route("/assets/{name}", page.asset),
    ]
    transport = httpx.ASGITransport(app=Starlette(routes=routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
        yield http


async def test_the_shell_is_never_cached_and_assets_are_cached_for_good(client: httpx.AsyncClient) -> None:
    for path in ("/", "/sessions/abc"):
        shell = await client.get(path)
        assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
        assert shell.headers["cache-control"] == "no-cache"
    for asset in first_load()[1:]:
        response = await client.get(f"/assets/{asset.name}", headers={"Accept-Encoding": "gzip"})
        assert response.status_code == 200
        assert response.content == asset.read_bytes()
        assert response.headers["content-encoding"] == "gzip"
        assert (
            "immutable" in response.headers["cache-control"] and "max-age=31536000" in response.headers["cache-control"]
        )
    assert (await client.get("/assets/nope.js")).status_code == 404
    assert (await client.get("/assets/..%2Fpage.py")).status_code == 404


async def test_every_page_response_has_a_strict_content_security_policy_and_nosniff(client: httpx.AsyncClient) -> None:
    for path in ("/", f"/assets/{first_load()[1].name}", "/assets/missing.js"):
        headers = (await client.get(path)).headers
        policy = headers["content-security-policy"]
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "style-src 'self'" in policy
        sources = [token for directive in policy.split(";") for token in directive.split()[1:]]
        assert all(s in ("'self'", "'none'", "data:") for s in sources), f"a source that is not ours: {policy}"
        assert headers["x-content-type-options"] == "nosniff"


def test_the_shell_has_no_inline_script_or_style() -> None:
    shell = (WEB / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", shell), "an inline script"
    assert "<style" not in shell and " style=" not in shell
