"""TESTPULSE_* variables across deploy/ and docs/operations.md agree with server/settings.py."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from deploy_support import DEPLOY, OPERATIONS, ROOT, load_script

from testpulse.settings import Settings, env_name

pytestmark = pytest.mark.deploy

SETTINGS_VARIABLES = {env_name(f.name) for f in dataclasses.fields(Settings)}


def sync_docs():
    return load_script(DEPLOY / "sync_docs.py")


def deploy_files():
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != ".env" and "__pycache__" not in path.parts:
            yield path


def test_every_testpulse_variable_in_deploy_is_one_settings_reads():
    seen: dict[str, set[str]] = {}
    for path in deploy_files():
        for name in re.findall(r"\bTESTPULSE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            seen.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    assert seen, "deploy/ configures nodes through TESTPULSE_* variables"
    unknown = {name: sorted(files) for name, files in seen.items() if name not in SETTINGS_VARIABLES}
    assert not unknown, f"not read by server/settings.py: {unknown}"


def test_operations_md_configuration_table_is_exactly_testpulse_config():
    module = sync_docs()
    argv = [str(ROOT / ".venv" / "bin" / "testpulse"), "config"]
    if not (ROOT / ".venv" / "bin" / "testpulse").exists():
        argv = [sys.executable, "-m", "testpulse", "config"]
    printed = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    committed = module.committed_table(OPERATIONS.read_text())
    assert committed == printed, "docs/operations.md is stale: run .venv/bin/python deploy/sync_docs.py"
    for variable in SETTINGS_VARIABLES:
        assert f"`{variable}`" in committed


def test_operations_md_covers_the_checklist_scaling_and_upgrades():
    text = OPERATIONS.read_text()
    for heading in (
        "## Configuration reference",
        "## Production checklist",
        "## Scaling out and limits",
        "## Upgrading without dropping sessions",
        "## Runbooks",
    ):
        assert heading in text
    for topic in ("TLS", "TESTPULSE_ALLOWED_ORIGINS", "requirepass", "max_connections", "last_seq", "server_draining"):
        assert topic in text, topic
