"""The image's recipe without Docker: build the wheel from what the Dockerfile copies, install it into a
fresh virtualenv outside the repository (the runtime lock, then the wheel, as the image does; then the
`loadtest` extra, as a user would), run the image's start command there and probe it the way the
HEALTHCHECK does; then, from an empty folder, every command that reads files shipped in the wheel:
`testpulse cluster` (nginx.conf) and `testpulse loadtest` (the Locust scenarios)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from deploy_support import ROOT, dockerfile_instructions, exec_form
from support.cluster import _described, stop_cluster_process
from support.processes import free_port, port_is_open, running, spawn, until_ready

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


def declares_asyncio_sqlalchemy() -> bool:
    """SQLAlchemy 2.1 no longer installs greenlet, which its asyncio extension needs; the project must
    ask for it (`sqlalchemy[asyncio]` or `greenlet`) or the image's node cannot start."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~;\s]", dep, maxsplit=1)[0].lower() for dep in dependencies]
    return any(name == "greenlet" or (name.startswith("sqlalchemy[") and "asyncio" in name) for name in names)


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([*PIP, *args], cwd=cwd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def build_context(into: Path) -> Path:
    """Copy exactly what the builder stage COPYs, so the wheel is built from the image's context."""
    src = into / "src"
    src.mkdir()
    for instruction in dockerfile_instructions():
        if instruction.stage == 0 and instruction.keyword == "COPY":
            *sources, _dest = instruction.args.split()
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, src / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    (src / source).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, src / source)
    return src


def locked_versions(into: Path) -> Path:
    """The dev lock without its hashes, as pip constraints: the extra installs the locked versions."""
    uv = Path(sys.executable).parent / "uv"
    constraints = into / "constraints.txt"
    export = [str(uv), "export", "--frozen", "--no-hashes", "--all-extras", "--no-emit-project", "-o", str(constraints)]
    subprocess.run([*export, "-q"], cwd=ROOT, check=True, timeout=60)
    return constraints


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with only the built wheel (and its dependencies) installed; returns its bin/."""
    work = tmp_path_factory.mktemp("wheel")
    src = build_context(work)
    dist = work / "dist"
    pip("wheel", "--no-deps", "--wheel-dir", str(dist), str(src), cwd=work)
    (wheel,) = dist.glob("testpulse-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    # As the image: exactly the runtime lock (hashes checked), then the wheel alone.
    pip("--python", python, "install", "--require-hashes", "-r", str(src / "requirements.lock"), cwd=work)
    pip("--python", python, "install", "--no-deps", str(wheel), cwd=work)
    # As a user who wants `testpulse loadtest`: the extra the README names, at the locked versions.
    pip("--python", python, "install", f"{wheel}[loadtest]", "-c", str(locked_versions(work)), cwd=work)
    return venv / "bin"


def outside_env(installed: Path, home: Path) -> dict[str, str]:
    """Nothing of the repository: the venv's scripts and the system's binaries (redis-server, nginx)."""
    return {
        "PATH": f"{installed}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "3",
    }


def top_level_packages(installed: Path) -> list[str]:
    """The import names the wheel put into site-packages, from its RECORD (a dist-info is not one)."""
    (record,) = installed.parent.glob("lib/python*/site-packages/testpulse-*.dist-info/RECORD")
    tops = {line.split("/", 1)[0] for line in record.read_text().splitlines() if "/" in line.split(",", 1)[0]}
    return sorted(top for top in tops if not top.endswith((".dist-info", ".data")) and top != "..")


def empty_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_wheel_installs_the_testpulse_package_and_the_testpulse_script(installed: Path, tmp_path: Path):
    where = subprocess.run(
        [str(installed / "python"), "-c", "import testpulse, sys; print(testpulse.__file__)"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.parent), f"imported the source tree: {where}"
    assert (installed / "testpulse").exists()
    assert top_level_packages(installed) == ["testpulse"]
    check = subprocess.run(
        [*PIP, "--python", str(installed / "python"), "check"], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_installed_wheel_migrates_from_its_own_revisions(installed: Path, tmp_path: Path):
    """The Alembic scripts ship as package data: `testpulse migrate` works outside the source tree."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    env["TESTPULSE_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'installed.db'}"
    migrate = subprocess.run(
        [str(installed / "testpulse"), "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    newest = max(
        p.name[:4] for p in (ROOT / "server" / "store" / "migrations" / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    )
    assert f"revision {newest} (this build's newest)" in migrate.stdout, migrate.stdout
    sql = subprocess.run(
        [str(installed / "testpulse"), "migrate", "--sql"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "ALTER TABLE detections ADD COLUMN id" in sql.stdout, sql.stderr


def test_installed_wheel_checks_the_schema_as_the_node_pods_do(installed: Path, tmp_path: Path):
    """`testpulse migrate --check`, the node pods' initContainer command, from the installed wheel:
    exit 1 before `testpulse migrate`, 0 after, on this build's newest revision."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    env["TESTPULSE_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'checked.db'}"

    def testpulse(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(installed / "testpulse"), *args]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    before = testpulse("migrate", "--check")
    assert before.returncode == 1, before.stdout + before.stderr
    assert "run `testpulse migrate`" in before.stderr, before.stderr
    assert not (tmp_path / "checked.db").exists(), "the check created the database"
    assert testpulse("migrate").returncode == 0
    after = testpulse("migrate", "--check", "--wait", "30")
    assert after.returncode == 0, after.stdout + after.stderr
    assert "this build's newest" in after.stdout, after.stdout


@pytest.mark.timeout(90)
@pytest.mark.xfail(
    not declares_asyncio_sqlalchemy(),
    reason="pyproject.toml does not depend on greenlet / sqlalchemy[asyncio]: the installed wheel cannot start",
    strict=True,
)
async def test_image_start_command_serves_health_in_the_installed_wheel(installed: Path, tmp_path: Path):
    cmd = exec_form(next(i.args for i in dockerfile_instructions() if i.keyword == "CMD"))
    port = free_port()
    argv = [str(installed / cmd[0]), *cmd[1:]]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"  # the image binds 0.0.0.0; loopback is enough here
    env = {
        "PATH": f"{installed}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TESTPULSE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}",
        "TESTPULSE_NODE_ID": "wheel-test",
        "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "5",
    }
    healthcheck = next(i.args for i in dockerfile_instructions() if i.keyword == "HEALTHCHECK")
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    probe = [str(installed / probe[0]), probe[1], probe[2].replace(":8000/", f":{port}/")]

    async def healthy() -> bool:
        check = await asyncio.create_subprocess_exec(
            *probe, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env, cwd=tmp_path
        )
        return await check.wait() == 0

    node = await spawn("testpulse-wheel", argv, log_path=tmp_path / "node.log", env=env, cwd=tmp_path)
    async with running(node, healthy, ready_timeout=30, stop_timeout=15):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            health = await http.get("/health")
            assert (health.status_code, health.json()) == (200, {"status": "healthy"})
            ready = await http.get("/ready")
            assert ready.status_code == 200, ready.text
            metrics = await http.get("/metrics")
            assert 'testpulse_node_info{node="wheel-test"' in metrics.text
            # The proxy routes on the node id at the start of every Engine.IO sid.
            handshake = await http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
            assert handshake.status_code == 200 and handshake.text.startswith("0{"), handshake.text
            assert json.loads(handshake.text[1:])["sid"].startswith("wheel-test.")
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(node.proc.wait(), 15)
        assert code == 0, node.log_tail()
        assert time.monotonic() - started < 5 + 5, "drain exceeded TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS"
    assert not port_is_open(port)


@pytest.mark.timeout(120)
async def test_installed_cluster_of_two_answers_through_nginx_and_stops_cleanly(installed: Path, tmp_path: Path):
    """`testpulse cluster` renders the nginx.conf shipped in the wheel; run from a folder with nothing in it."""
    cwd = empty_folder(tmp_path)
    output = tmp_path / "cluster.out"
    argv = [str(installed / "testpulse"), "cluster", "--json", "--nodes", "2", "--port", str(free_port())]
    argv += ["--run-dir", str(tmp_path / "run")]
    process = await spawn(
        "testpulse cluster (wheel)", argv, log_path=output, env=outside_env(installed, tmp_path), cwd=cwd
    )
    try:

        async def described() -> bool:
            return _described(output) is not None

        await until_ready(process, described, deadline=60)
        info = _described(output)
        assert info is not None
        assert [node["id"] for node in info["nodes"]] == ["node1", "node2"]
        async with httpx.AsyncClient(base_url=info["proxy"], timeout=5) as http:
            health = await http.get("/health")
            assert (health.status_code, health.json()) == (200, {"status": "healthy"})
            assert health.headers.get("server", "").startswith("nginx"), health.headers
            handshake = await http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
            assert handshake.status_code == 200 and handshake.text.startswith("0{"), handshake.text
        assert (cwd / "testpulse.db").exists(), "the default database lands in the working folder"
    finally:
        await stop_cluster_process(process)  # proves the command and all it started are gone
    assert process.proc.returncode == 0, process.log_tail()
    assert "testpulse cluster: stopping" in output.read_text()


@pytest.mark.timeout(240)
def test_installed_short_loadtest_passes_its_gate_from_an_empty_folder(installed: Path, tmp_path: Path):
    """`testpulse loadtest` runs the Locust scenarios shipped in the wheel (the `loadtest` extra) against a
    local two-node cluster: a few users for a few seconds, correctness objectives only."""
    cwd = empty_folder(tmp_path)
    results = tmp_path / "results"
    argv = [str(installed / "testpulse"), "loadtest", "storm", "--nodes", "2", "--results", str(results)]
    argv += ["--users", "8", "--spawn-rate", "8", "--run-time", "4s", "--drain-timeout", "15"]
    argv += ["--slo-connect-p99-ms=off", "--slo-delivery-p99-ms=off", "--slo-failure-ratio=0", "--slo-max-gaps=0"]
    done = subprocess.run(
        argv, cwd=cwd, env=outside_env(installed, tmp_path), capture_output=True, text=True, timeout=220, check=False
    )
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert "PASSED, every objective held" in done.stdout, tail
    summary = json.loads((results / "summary.json").read_text())
    assert summary["delivery"]["published"] > 0 and summary["delivery"]["gaps"] == 0, tail


def test_wheel_ships_the_page_exactly_as_committed(installed: Path, tmp_path: Path):
    """The built page is package data (pip install needs no Node): the installed copy is the
    committed server/web/, byte for byte, so neither can go stale behind the other."""
    where = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            "import testpulse, pathlib; print(pathlib.Path(testpulse.__file__).parent / 'web')",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    shipped = Path(where)
    committed = ROOT / "server" / "web"

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    assert files(committed), "server/web/ is empty: run ./scripts/build-web"
    assert files(shipped) == files(committed)


def test_token_url_prints_a_link_with_the_token_in_the_fragment(installed: Path, tmp_path: Path):
    done = subprocess.run(
        [str(installed / "testpulse"), "token", "--role", "operator", "--url", "http://127.0.0.1:8080/"],
        cwd=tmp_path,
        env=outside_env(installed, tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    link = done.stdout.strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:8080/#token=[\w-]+\.[\w-]+\.[\w-]+", link), link
