"""The TestExecution page in a real headless Chromium (Debian's, driven by playwright-core from
tests/browser/driver.mjs) against a fresh 3-node cluster behind nginx per test, on a redis-server
of the test's own, with a steady publisher over HTTP.

What the tests read is the contract's `window.testpulse`; screenshots go to the test's tmp dir and
to artifacts/browser/ (ignored by git) so a CI run keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.cluster import RunningCluster, http_status, run_cluster
from support.processes import ROOT, RedisServer, run_redis, wait_until

pytestmark = pytest.mark.browser

DRIVER = Path(__file__).with_name("driver.mjs")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "browser"


@pytest.fixture(autouse=True)
def _needs_chromium() -> None:
    missing = [
        what
        for what, ok in (
            (CHROMIUM, Path(CHROMIUM).exists()),
            ("node", shutil.which("node") is not None),
            ("node_modules/playwright-core", (ROOT / "node_modules" / "playwright-core").is_dir()),
        )
        if not ok
    ]
    if missing:
        pytest.fail(f"the browser suite needs {', '.join(missing)}: run ./scripts/setup")


class Browser:
    """One Chromium for the whole run; each page is a context of its own (own sessionStorage)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._pages = itertools.count(1)

    async def call(self, cmd: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            ident = next(self._ids)
            self.proc.stdin.write((json.dumps({"id": ident, "cmd": cmd, **args}) + "\n").encode())
            await self.proc.stdin.drain()
            while True:
                line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
                if not line:
                    raise RuntimeError("the browser driver exited")
                answer = json.loads(line)
                if answer.get("id") == ident:
                    break
        if not answer["ok"]:
            raise RuntimeError(f"{cmd}: {answer['error']}")
        return answer["result"]

    async def open(self, url: str) -> Page:
        page = Page(self, f"p{next(self._pages)}")
        await self.call("open", page=page.name, url=url)
        return page


@dataclass
class Page:
    browser: Browser
    name: str
    # Set by a test that kills or restarts nodes: Chromium logs the cut socket.io requests
    # (`WebSocket connection ... failed`, `ERR_CONNECTION_REFUSED`), which are the outage under test.
    outages_expected: bool = False
    # What problems() said when a test closed the page itself (the fixture reads it then).
    problems_at_close: list[str] | None = None

    async def eval(self, js: str) -> Any:
        return await self.browser.call("eval", page=self.name, js=js)

    async def testpulse(self) -> dict[str, Any]:
        return dict(await self.eval("() => window.testpulse"))

    async def click(self, selector: str) -> None:
        await self.browser.call("click", page=self.name, selector=selector)

    async def fill(self, selector: str, value: str) -> None:
        await self.browser.call("fill", page=self.name, selector=selector, value=value)

    async def press(self, key: str) -> None:
        await self.browser.call("press", page=self.name, key=key)

    async def problems(self) -> list[str]:
        return list(await self.browser.call("problems", page=self.name))

    async def traffic(self) -> tuple[list[str], list[str]]:
        """Every request and WebSocket URL the page opened, and every console message it wrote."""
        seen = await self.browser.call("traffic", page=self.name)
        return list(seen["urls"]), list(seen["console"])

    async def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.browser.call("screenshot", page=self.name, path=str(path))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ARTIFACTS / path.name)
        return path

    async def close(self) -> None:
        self.problems_at_close = await self.problems()
        await self.browser.call("close", page=self.name)

    async def wait_for(self, check: Callable[[dict[str, Any]], bool], what: str, deadline: float = 30.0) -> None:
        last: dict[str, Any] = {}

        async def probe() -> bool:
            nonlocal last
            # The page sets window.testpulse when its view mounts, which can be after `load`.
            if not await self.eval("() => window.testpulse !== undefined"):
                return False
            last = await self.testpulse()
            return check(last)

        try:
            await wait_until(probe, deadline=deadline, interval=0.1, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; window.testpulse = {last}") from None

    async def watch_connection(self) -> None:
        """Record every value window.testpulse.connection takes (in window.__connections): an outage
        can be shorter than a poll. The property stays a plain enumerable value to every reader."""
        await self.eval(
            """() => {
              const t = window.testpulse; let value = t.connection; window.__connections = [value];
              Object.defineProperty(t, "connection", { enumerable: true, configurable: true,
                get() { return value; },
                set(v) { if (v !== value) window.__connections.push(v); value = v; } });
            }"""
        )

    async def connections_seen(self) -> list[str]:
        return list(await self.eval("() => window.__connections"))


@pytest.fixture(scope="session")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    log = open(tmp_path_factory.mktemp("browser") / "driver.log", "wb")  # noqa: SIM115, ASYNC230 - closed below
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        cwd=ROOT,
        env={**os.environ, "CHROMIUM": CHROMIUM},
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60) or b"{}")
        assert ready.get("type") == "ready", "the browser driver did not start (see driver.log)"
        yield Browser(proc)
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(workdir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}"


@pytest.fixture
async def cluster(tmp_path: Path, database_url: str, redis: RedisServer) -> AsyncIterator[RunningCluster]:
    async with run_cluster(tmp_path / "cluster", database_url, redis_url=redis.url) as running:
        yield running


def page_url(cluster: RunningCluster, role: str, session_id: str | None = None, query: str = "") -> str:
    """The page with a token in the fragment, as `testpulse token --url` prints it."""
    path = f"/sessions/{session_id}" if session_id else "/"
    token = cluster.token(role, sub=f"{role}-{session_id or 'list'}")
    return f"{cluster.proxy}{path}{query}#token={token}"


async def ready_node(cluster: RunningCluster) -> str:
    for node in cluster.nodes:
        if await http_status(f"{node.url}/ready") == 200:
            return node.url
    return cluster.proxy


async def new_session(cluster: RunningCluster, name: str, *, start: bool = True) -> str:
    async with httpx.AsyncClient(base_url=cluster.proxy, timeout=10.0, headers=cluster.headers("operator")) as http:
        created = await http.post("/api/sessions", json={"name": name})
        assert created.status_code == 201, created.text
        session_id = str(created.json()["session"]["id"])
        if start:
            started = await http.post(f"/api/sessions/{session_id}/start")
            assert started.status_code == 200, started.text
    return session_id


async def stored_last_seq(cluster: RunningCluster, session_id: str) -> int:
    async with httpx.AsyncClient(base_url=await ready_node(cluster), timeout=10.0) as http:
        response = await http.get(f"/api/sessions/{session_id}", headers=cluster.headers("admin"))
    assert response.status_code == 200, response.text
    return int(response.json()["session"]["last_seq"])


@dataclass
class Publisher:
    """Publishes `batch` detections every `interval` seconds over HTTP straight to a node, moving to
    the next node when one fails (the node under a kill or a restart)."""

    cluster: RunningCluster
    session_id: str
    batch: int = 5
    interval: float = 0.05
    published: int = 0
    failures: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _run(self) -> None:
        headers = self.cluster.headers("detector")
        nodes = itertools.cycle(self.cluster.nodes)
        node = next(nodes)
        labels = ("person", "car", "bicycle", "dog", "truck")
        async with httpx.AsyncClient(timeout=3.0, headers=headers) as http:
            frame = 0
            while True:
                frame += 1
                body = {
                    "detections": [
                        {
                            "label": labels[(frame + i) % len(labels)],
                            "confidence": ((frame * 7 + i * 13) % 100) / 100,
                            "bbox": [10 * i, 20, 64, 48],
                            "frame": frame,
                            "ts": time.time() * 1000,
                        }
                        for i in range(self.batch)
                    ]
                }
                try:
                    response = await http.post(f"{node.url}/api/sessions/{self.session_id}/detections", json=body)
                    ok = response.status_code == 201
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.published += self.batch
                else:
                    self.failures += 1
                    node = next(nodes)
                await asyncio.sleep(self.interval)

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@contextlib.asynccontextmanager
async def publishing(cluster: RunningCluster, session_id: str, **kwargs: Any) -> AsyncIterator[Publisher]:
    publisher = Publisher(cluster, session_id, **kwargs).start()
    try:
        yield publisher
    finally:
        await publisher.stop()


async def caught_up(page: Page, cluster: RunningCluster, session_id: str, deadline: float = 30.0) -> dict[str, Any]:
    """Wait until the page holds the session's stored last_seq; returns window.testpulse."""
    last_seq = await stored_last_seq(cluster, session_id)
    await page.wait_for(
        lambda t: t["lastSeq"] == last_seq and t["connection"] == "connected", f"page at seq {last_seq}", deadline
    )
    return await page.testpulse()


OpenPage = Callable[..., Awaitable[Page]]


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Opens pages for one test and closes them after it, failing it on any console error."""
    pages: list[Page] = []

    async def opener(url: str) -> Page:
        page = await browser.open(url)
        pages.append(page)
        return page

    yield opener
    problems = {}
    for page in pages:
        closed = page.problems_at_close is not None
        found = page.problems_at_close if page.problems_at_close is not None else await page.problems()
        if page.outages_expected:
            found = [line for line in found if "/socket.io/" not in line]
        if found:
            problems[page.name] = found
        if not closed:
            await page.close()
    assert problems == {}, f"console errors or failed requests on the pages: {problems}"
