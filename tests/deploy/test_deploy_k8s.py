"""deploy/k8s: the kustomization renders to resources that validate against the Kubernetes schemas,
and its probes, ports, drain timing and settings agree with the code."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from deploy_support import (
    K8S,
    OPERATIONS,
    PROMETHEUS,
    dockerfile_instructions,
    exec_form,
    find,
    http_routes,
    load_yaml_documents,
    render_kustomization,
    serve_port,
)

from testpulse.cli import parser
from testpulse.settings import Settings

pytestmark = pytest.mark.deploy

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

# The newest schemas the validator ships, and an older release still common in managed clusters.
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return render_kustomization(K8S)


@pytest.fixture(scope="module")
def statefulset(resources) -> dict[str, Any]:
    return find(resources, "StatefulSet", "testpulse-node")


@pytest.fixture(scope="module")
def node_container(statefulset) -> dict[str, Any]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def init_container(statefulset) -> dict[str, Any]:
    (container,) = statefulset["spec"]["template"]["spec"]["initContainers"]
    return container


@pytest.fixture(scope="module")
def migrate_job(resources) -> dict[str, Any]:
    return find(resources, "Job", "testpulse-migrate")


@pytest.fixture(scope="module")
def job_container(migrate_job) -> dict[str, Any]:
    (container,) = migrate_job["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def node_config(resources) -> dict[str, str]:
    return find(resources, "ConfigMap", "testpulse-node-config")["data"]


def strip_hashes(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_hashes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_hashes(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"^(testpulse-[a-z-]+?)-[a-z0-9]{10}$", r"\1", value)
    return value


def by_kind_and_name(resources: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    return {(r["kind"], r["metadata"]["name"]): r for r in strip_hashes(resources)}


def test_kustomization_renders_every_resource_the_cluster_needs(resources):
    kinds = {(r["kind"], re.sub(r"-[a-z0-9]{10}$", "", r["metadata"]["name"])) for r in resources}
    assert kinds == {
        ("Namespace", "testpulse"),
        ("StatefulSet", "testpulse-node"),
        ("Service", "testpulse-nodes"),
        ("PodDisruptionBudget", "testpulse-node"),
        ("NetworkPolicy", "testpulse-node"),
        ("Deployment", "testpulse-proxy"),
        ("Service", "testpulse-proxy"),
        ("ConfigMap", "testpulse-node-config"),
        ("ConfigMap", "testpulse-proxy-nginx"),
        ("Job", "testpulse-migrate"),
    }
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "testpulse"


def test_the_test_renderer_agrees_with_kubectl_kustomize(resources):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the resources are still rendered and validated in Python")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert by_kind_and_name(rendered) == by_kind_and_name(resources)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_resource_validates_against_the_kubernetes_schema(resources, version):
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_secret_example_validates_and_is_not_applied_by_kustomize(version):
    (secret,) = load_yaml_documents(K8S / "secret.example.yaml")
    kubernetes_validate.validate(secret, version, strict=True)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]


def test_nodes_are_configured_by_configmap_and_secret_that_a_production_node_accepts(node_container, node_config):
    (secret,) = load_yaml_documents(K8S / "secret.example.yaml")
    config_refs = [ref["configMapRef"]["name"] for ref in node_container["envFrom"] if "configMapRef" in ref]
    assert [re.sub(r"-[a-z0-9]{10}$", "", name) for name in config_refs] == ["testpulse-node-config"]
    assert secret["metadata"]["name"] in [ref.get("secretRef", {}).get("name") for ref in node_container["envFrom"]]
    env = {**node_config, **secret["stringData"], "TESTPULSE_NODE_ID": "testpulse-node-0"}
    settings = Settings.from_env(env)
    assert settings.production
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.redis_url
    for key in ("TESTPULSE_JWT_SECRET", "TESTPULSE_DATABASE_URL", "TESTPULSE_REDIS_URL"):
        assert key not in node_config, f"{key} is a secret, not ConfigMap data"
    (node_id,) = [e for e in node_container["env"] if e["name"] == "TESTPULSE_NODE_ID"]
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_node_container_runs_the_image_command_on_the_probed_and_scraped_port(statefulset, node_container):
    image_cmd = exec_form(next(i.args for i in dockerfile_instructions() if i.keyword == "CMD"))
    assert node_container["command"] == image_cmd
    port = serve_port(node_container["command"])
    (http,) = node_container["ports"]
    assert (http["name"], http["containerPort"]) == ("http", port)
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] in http_routes()


def test_probes_use_health_for_liveness_and_ready_for_readiness(node_container):
    routes = http_routes()
    assert node_container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert node_container["startupProbe"]["httpGet"]["path"] == "/health"
    assert node_container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert node_container[probe]["httpGet"]["path"] in routes
        assert node_container[probe]["httpGet"]["port"] == "http"


def test_termination_grace_covers_prestop_and_the_drain_timeout(statefulset, node_container, node_config):
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = node_container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(node_config["TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS"])
    assert grace > int(pre_stop[1]) + drain, "SIGKILL would cut the drain short"


def test_nodes_have_resources_and_run_unprivileged(statefulset, node_container):
    resources = node_container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = next(i.args for i in dockerfile_instructions() if i.keyword == "USER").split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == user
    assert node_container["securityContext"]["readOnlyRootFilesystem"] is True


def test_headless_service_pdb_and_network_policy_select_the_node_pods(resources, statefulset):
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    service = find(resources, "Service", "testpulse-nodes")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = find(resources, "PodDisruptionBudget", "testpulse-node")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] < statefulset["spec"]["replicas"]
    policy = find(resources, "NetworkPolicy", "testpulse-node")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    proxy_labels = find(resources, "Deployment", "testpulse-proxy")["spec"]["template"]["metadata"]["labels"]
    allowed = [peer.get("podSelector", {}).get("matchLabels", {}) for peer in policy["spec"]["ingress"][0]["from"]]
    assert any(labels.items() <= proxy_labels.items() for labels in allowed), "the proxy must reach the nodes"


def test_proxy_runs_the_generated_nginx_conf_on_the_port_it_listens_on(resources):
    proxy = find(resources, "Deployment", "testpulse-proxy")
    pod = proxy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = find(resources, "ConfigMap", "testpulse-proxy-nginx")
    assert config["data"]["nginx.conf"] == (K8S / "nginx.conf").read_text()
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert container["command"][container["command"].index("-c") + 1] == f"{mount['mountPath']}/nginx.conf"
    listens = re.findall(r"^\s*listen\s+(\d+)\b", config["data"]["nginx.conf"], re.MULTILINE)
    (http,) = container["ports"]
    assert [str(http["containerPort"])] == listens
    service = find(resources, "Service", "testpulse-proxy")
    assert service["spec"]["ports"][0]["targetPort"] == http["name"]
    assert "location /socket.io/" in config["data"]["nginx.conf"]
    assert not any("ingress" in str(r.get("apiVersion", "")).lower() for r in resources), "no ingress-nginx"


def test_servicemonitor_example_scrapes_the_headless_service_metrics_port(resources):
    (monitor,) = load_yaml_documents(K8S / "servicemonitor.example.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    service = find(resources, "Service", "testpulse-nodes")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] in http_routes()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]


def test_prometheus_kubernetes_discovery_keeps_exactly_the_annotated_node_pods(statefulset):
    config = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    (discovery,) = job["kubernetes_sd_configs"]
    assert discovery["role"] == "pod"
    assert discovery["namespaces"]["names"] == ["testpulse"]
    template = statefulset["spec"]["template"]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    name_label = keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]
    assert re.fullmatch(name_label, template["metadata"]["labels"]["app.kubernetes.io/name"])
    scrape = keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]
    assert re.fullmatch(scrape, template["metadata"]["annotations"]["prometheus.io/scrape"])
    port_name = keeps[("__meta_kubernetes_pod_container_port_name",)]
    assert re.fullmatch(port_name, template["spec"]["containers"][0]["ports"][0]["name"])


# ---- the schema: the migrate Job owns it, the nodes wait for it --------------------------------


def parsed(argv: list[str]) -> Any:
    """A `testpulse ...` command line as the real CLI reads it."""
    assert argv[0] == "testpulse", argv
    return parser().parse_args(argv[1:])


def test_migrate_job_runs_testpulse_migrate_in_the_nodes_image_with_their_config_and_secret(
    statefulset, node_container, migrate_job, job_container
):
    assert job_container["image"] == node_container["image"]
    assert job_container["imagePullPolicy"] == node_container["imagePullPolicy"]
    assert job_container["command"] == ["testpulse", "migrate"]
    args = parsed(job_container["command"])
    assert (args.command, args.sql, args.check) == ("migrate", False, False)
    assert job_container["envFrom"] == node_container["envFrom"]
    node_env = {e["name"]: e for e in node_container.get("env", [])}
    for variable in job_container.get("env", []):
        assert node_env.get(variable["name"]) == variable, f"{variable['name']} differs from the nodes'"
    job_pod, node_pod = migrate_job["spec"]["template"]["spec"], statefulset["spec"]["template"]["spec"]
    assert job_pod["securityContext"] == node_pod["securityContext"]
    assert job_container["securityContext"] == node_container["securityContext"]
    assert {m["mountPath"] for m in job_container["volumeMounts"]} == {"/tmp"}, "a writable /tmp, nothing else"
    assert job_container["resources"]["requests"] and job_container["resources"]["limits"]["memory"]


def test_migrate_job_runs_once_retries_a_few_times_and_cleans_itself_up(resources, migrate_job):
    spec = migrate_job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never", "each attempt a pod of its own, its log kept"
    assert 1 <= spec["backoffLimit"] <= 5
    assert spec.get("completions", 1) == 1 and spec.get("parallelism", 1) == 1
    assert spec["activeDeadlineSeconds"] > 0
    assert 0 < spec["ttlSecondsAfterFinished"] <= 7 * 24 * 3600
    job_pod_labels = spec["template"]["metadata"]["labels"]
    for kind, name in (("Service", "testpulse-nodes"), ("PodDisruptionBudget", "testpulse-node")):
        selector = find(resources, kind, name)["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert not selector.items() <= job_pod_labels.items(), f"the {kind} would count the Job's pod as a node"


def test_node_pods_wait_for_the_schema_in_the_nodes_image_and_environment(node_container, init_container):
    assert init_container["image"] == node_container["image"]
    assert init_container["env"] == node_container["env"]
    assert init_container["envFrom"] == node_container["envFrom"]
    assert init_container["securityContext"] == node_container["securityContext"]
    args = parsed(init_container["command"])
    assert (args.command, args.check, args.sql) == ("migrate", True, False), "a check, never a migration"
    assert 0 < args.wait <= 900, "a bounded wait: the kubelet runs it again after its log says why"
    assert "startupProbe" not in init_container and "readinessProbe" not in init_container


def test_nodes_do_not_migrate_by_themselves_when_the_job_owns_the_schema(node_container, node_config):
    assert node_config["TESTPULSE_MIGRATE_ON_START"] == "false", "explicit, not the production default"
    (secret,) = load_yaml_documents(K8S / "secret.example.yaml")
    settings = Settings.from_env({**node_config, **secret["stringData"]})
    assert not settings.migrates_on_start
    assert parsed(node_container["command"]).command == "serve"


def test_the_migrate_step_label_selects_exactly_the_job_and_the_config_it_reads(resources, migrate_job):
    def key(resource: dict[str, Any]) -> tuple[str, str]:
        return resource["kind"], re.sub(r"-[a-z0-9]{10}$", "", resource["metadata"]["name"])

    step = {key(r) for r in resources if r["metadata"].get("labels", {}).get("testpulse/upgrade-step") == "migrate"}
    assert step == {("Job", "testpulse-migrate"), ("ConfigMap", "testpulse-node-config")}
    config_refs = [
        s["configMapRef"]["name"]
        for s in migrate_job["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        if "configMapRef" in s
    ]
    labelled = [r["metadata"]["name"] for r in resources if key(r) == ("ConfigMap", "testpulse-node-config")]
    assert config_refs == labelled, "the Job reads the ConfigMap the step applies, under its hashed name"


def upgrade_commands() -> list[list[str]]:
    """The kubectl commands of docs/operations.md's "Upgrading with live viewers" code block."""
    text = OPERATIONS.read_text()
    section = text.split("## Upgrading with live viewers", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [line.split() for line in block.splitlines() if line.startswith("kubectl ")]


def test_upgrading_with_live_viewers_migrates_then_rolls_the_resources_the_manifests_define(
    resources, statefulset, migrate_job, init_container
):
    commands = upgrade_commands()
    namespace = statefulset["metadata"]["namespace"]
    job, nodes = f"job/{migrate_job['metadata']['name']}", f"statefulset/{statefulset['metadata']['name']}"
    for command in commands:
        assert command[1:3] == ["-n", namespace] or command[1:3] == ["apply", "-k"], command

    def index(*words: str) -> int:
        (found,) = [i for i, c in enumerate(commands) if all(w in c for w in words)]
        return found

    delete = index("delete", "job", migrate_job["metadata"]["name"])
    assert "--ignore-not-found" in commands[delete]
    migrate = index("apply", "-l")
    label = commands[migrate][commands[migrate].index("-l") + 1]
    name, _, value = label.partition("=")
    assert migrate_job["metadata"]["labels"][name] == value
    assert commands[migrate][commands[migrate].index("-k") + 1] == "deploy/k8s"
    waited = index("wait", job)
    assert "--for=condition=complete" in commands[waited]
    roll = next(i for i, c in enumerate(commands) if c[1:4] == ["apply", "-k", "deploy/k8s"] and "-l" not in c)
    rolled = index("rollout", "status", nodes, "--timeout=30m")
    assert delete < migrate < waited < roll < rolled, "migrate, wait for it, then roll"
    assert find(resources, "PodDisruptionBudget", "testpulse-node")["metadata"]["name"] in commands[index("get", "pdb")]
    text = OPERATIONS.read_text()
    assert f"-c {init_container['name']}" in text
    assert " ".join(init_container["command"]) in text, "the doc quotes the initContainer's command"
