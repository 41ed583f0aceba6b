"""deploy/docker-compose.yml: valid against the Compose spec, private dependencies, secrets from
deploy/.env only, and node settings that a production node accepts."""

from __future__ import annotations

import json
import re
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import COMPOSE, DEPLOY, ROOT, dockerfile_instructions, exec_form

from testpulse.settings import Settings

pytestmark = pytest.mark.deploy

NODES = ("node1", "node2", "node3")


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (a literal $)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return env_file(DEPLOY / "env.example")


def test_compose_file_is_valid_against_the_compose_spec(compose):
    jsonschema = pytest.importorskip("jsonschema")
    # check-jsonschema (the dev extra that ./scripts/setup installs) ships the Compose spec schema.
    schema_text = (resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json").read_text()
    errors = sorted(jsonschema.Draft7Validator(json.loads(schema_text)).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_redis_is_private_and_requires_the_password_from_the_env_file(compose):
    redis = compose["services"]["redis"]
    assert "ports" not in redis and "expose" not in redis
    assert "requirepass" in " ".join(redis["command"])
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    for network in redis["networks"]:
        assert compose["networks"][network].get("internal") is True


def test_postgres_keeps_its_data_in_a_volume_and_publishes_no_port(compose):
    postgres = compose["services"]["postgres"]
    assert "ports" not in postgres
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pgdata" in compose["volumes"]
    for network in postgres["networks"]:
        assert compose["networks"][network].get("internal") is True


def test_three_nodes_run_the_image_built_from_deploy_dockerfile(compose):
    for node in NODES:
        service = compose["services"][node]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert "ports" not in service, "nodes are reached through nginx only"
        assert "command" not in service, "the image's CMD is the start command"
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > float(service["environment"]["TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (ROOT / "deploy" / "Dockerfile").exists()


def test_node_environment_from_env_example_is_accepted_by_a_production_node(compose, example_env):
    ids = set()
    for node in NODES:
        environment = interpolate(compose["services"][node]["environment"], example_env)
        assert environment["TESTPULSE_ENV"] == "production"
        assert environment["TESTPULSE_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert "@postgres:5432/" in environment["TESTPULSE_DATABASE_URL"]
        assert environment["TESTPULSE_REDIS_URL"] == f"redis://:{example_env['REDIS_PASSWORD']}@redis:6379/0"
        settings = Settings.from_env({k: str(v) for k, v in environment.items()})
        assert settings.production and settings.redis_url
        ids.add(settings.node_id)
    assert ids == set(NODES)


def test_secrets_come_only_from_the_env_file(compose, example_env):
    text = COMPOSE.read_text()
    for key, value in example_env.items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value not in text, f"the value of {key} is written into docker-compose.yml"
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${") and ":?" in str(value), f"{key} must come from deploy/.env"
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(compose["services"]["node1"]["environment"], {**example_env, "REDIS_PASSWORD": ""})


def test_deploy_env_is_gitignored_and_env_example_is_not():
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "deploy/.env must be gitignored"
    example = subprocess.run(["git", "check-ignore", "-q", "deploy/env.example"], cwd=ROOT, check=False)
    assert example.returncode == 1


def test_env_example_defines_every_variable_compose_requires(compose, example_env):
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required <= set(example_env), sorted(required - set(example_env))


def test_nginx_uses_the_rendered_repository_nginx_conf_and_is_the_only_public_entry(compose):
    nginx = compose["services"]["nginx"]
    assert "./nginx/compose.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    public = {
        name
        for name, service in compose["services"].items()
        for port in service.get("ports", [])
        if not str(port).startswith("127.0.0.1:")
    }
    assert public == {"nginx"}
    for node in NODES:
        assert set(compose["services"][node]["networks"]) & set(nginx["networks"])


def test_nginx_published_port_is_the_port_nginx_conf_listens_on(compose):
    conf = (DEPLOY / "nginx" / "compose.conf").read_text()
    listens = set(re.findall(r"^\s*listen\s+(\d+)\b", conf, re.MULTILINE))
    published = {str(port).split(":")[-1] for port in compose["services"]["nginx"]["ports"]}
    assert published <= listens, f"nginx.conf listens on {listens}, compose publishes {published}"


def test_image_healthcheck_and_node_port_agree_with_compose_targets():
    cmd = exec_form(next(i.args for i in dockerfile_instructions() if i.keyword == "CMD"))
    port = cmd[cmd.index("--port") + 1]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "compose.yml").read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        if job["job_name"] == "testpulse"
        for s in job["static_configs"]
        for t in s["targets"]
    ]
    assert all(t.endswith(f":{port}") for t in targets)
