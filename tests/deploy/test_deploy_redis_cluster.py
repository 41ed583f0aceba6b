"""deploy/docker-compose.redis-cluster.yml: valid against the Compose spec, a Redis Cluster of three
masters and three replicas formed by a one-shot job, private and password-protected, and node
settings (a `redis+cluster://` URL) that a production node accepts."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY
from test_deploy_compose import env_file, interpolate

from testpulse.settings import Settings
from testpulse.urls import parse_cluster_url

pytestmark = pytest.mark.deploy

FILE = DEPLOY / "docker-compose.redis-cluster.yml"
NODES = ("node1", "node2", "node3")
SERVERS = tuple(f"redis-{i}" for i in range(1, 7))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(FILE.read_text())


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return env_file(DEPLOY / "env.example")


def test_the_redis_cluster_compose_file_is_valid_against_the_compose_spec(compose):
    jsonschema = pytest.importorskip("jsonschema")
    schema_text = (resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json").read_text()
    errors = sorted(jsonschema.Draft7Validator(json.loads(schema_text)).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_six_cluster_enabled_servers_are_private_password_protected_and_keep_their_nodes_conf(compose):
    for name in SERVERS:
        server = compose["services"][name]
        command = " ".join(server["command"])
        assert "--cluster-enabled yes" in command and "--cluster-config-file nodes.conf" in command
        assert "--requirepass" in command and "--masterauth" in command  # replicas log in to their master
        assert server["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
        assert "ports" not in server and "expose" not in server
        assert all(compose["networks"][n].get("internal") is True for n in server["networks"])
        (volume,) = server["volumes"]
        assert volume.endswith(":/data") and volume.split(":")[0] in compose["volumes"]


def test_the_init_job_forms_three_masters_with_a_replica_each_once(compose):
    init = compose["services"]["redis-cluster-init"]
    command = " ".join(init["command"])
    assert "--cluster create" in command and "--cluster-replicas 1" in command and "--cluster-yes" in command
    assert all(name in command for name in SERVERS)
    assert "cluster_state:ok" in command, "a second run must find the cluster formed and not create it again"
    assert set(init["depends_on"]) == set(SERVERS)
    assert all(dep["condition"] == "service_healthy" for dep in init["depends_on"].values())
    assert init["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")


def test_nodes_wait_for_the_cluster_and_a_production_node_accepts_their_redis_cluster_url(compose, example_env):
    for node in NODES:
        service = compose["services"][node]
        assert service["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
        environment = interpolate(service["environment"], example_env)
        settings = Settings.from_env({k: str(v) for k, v in environment.items()})
        assert settings.production and settings.redis_url
        target = parse_cluster_url(settings.redis_url)
        assert target.password == example_env["REDIS_PASSWORD"]
        assert {host for host, _ in target.seeds} <= set(SERVERS)


def test_env_example_defines_every_variable_the_redis_cluster_file_requires():
    required = set(re.findall(r"\$\{(\w+):\?", FILE.read_text()))
    defined = set(env_file(DEPLOY / "env.example"))
    assert required <= defined, sorted(required - defined)


def test_the_kubernetes_secret_example_names_a_redis_cluster_url_a_node_accepts():
    text = (DEPLOY / "k8s" / "secret.example.yaml").read_text()
    (url,) = re.findall(r"rediss\+cluster://\S+", text)
    target = parse_cluster_url(Settings.from_env({"TESTPULSE_REDIS_URL": url}).redis_url or "")
    assert target.tls and len(target.seeds) == 2
