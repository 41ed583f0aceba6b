"""The committed lock: uv.lock matches pyproject.toml, the pip-installable exports match uv.lock, and
none of them names a machine's own mirror (they must install anywhere that reaches PyPI)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_support import ROOT

pytestmark = pytest.mark.deploy

UV = Path(sys.executable).parent / "uv"
EXPORTS = {
    "requirements.lock": [],
    "requirements-dev.lock": ["--all-extras"],
}


def uv(*args: str) -> subprocess.CompletedProcess[str]:
    assert UV.exists(), "uv is missing: ./scripts/setup installs the dev extra"
    return subprocess.run([str(UV), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def without_header(text: str) -> str:
    """uv's header names the output file; what matters is every line after it."""
    return re.sub(r"\A(#[^\n]*\n)+", "", text)


def test_uv_lock_matches_pyproject():
    check = uv("lock", "--check", "--offline")
    assert check.returncode == 0, f"uv.lock is stale: run `.venv/bin/uv lock`\n{check.stderr}"


@pytest.mark.parametrize("name", EXPORTS)
def test_export_matches_uv_lock(name: str):
    export = uv("export", "--frozen", "--no-emit-project", "--format", "requirements-txt", *EXPORTS[name])
    assert export.returncode == 0, export.stderr
    committed = (ROOT / name).read_text()
    assert without_header(committed) == without_header(export.stdout), (
        f"{name} does not match uv.lock: re-export it (docs/development.md)"
    )
    assert "--hash=sha256:" in committed


def test_every_locked_package_comes_from_pypi_and_no_local_path_is_recorded():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    sources = {
        str(package["source"].get("registry", package["source"]))
        for package in lock["package"]
        if package["name"] != "testpulse"
    }
    assert sources == {"https://pypi.org/simple"}
    for name in ("uv.lock", *EXPORTS):
        text = (ROOT / name).read_text()
        assert "file://" not in text and "/opt/" not in text, f"{name} records a machine's own path"


def test_runtime_export_has_no_development_tools():
    names = set(re.findall(r"^([a-z0-9][a-z0-9._-]*)==", (ROOT / "requirements.lock").read_text(), re.M))
    assert {"uvicorn", "python-socketio", "python-engineio", "websockets", "redis"} <= names
    assert not names & {"pytest", "locust", "ruff", "mypy", "uv"}, names & {"pytest", "locust", "ruff", "mypy", "uv"}
