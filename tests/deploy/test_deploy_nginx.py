"""The proxy configs of deploy/ are the repository's nginx.conf, rendered only where it is meant to
be, nginx accepts them, and their routing matches the node ids the deployments give their nodes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_support import COMPOSE, DEPLOY, K8S, NGINX_CONF, load_script

from testpulse.app import sid_tag

pytestmark = pytest.mark.deploy

RENDERED = {"compose": DEPLOY / "nginx" / "compose.conf", "kubernetes": K8S / "nginx.conf"}


def renderer():
    return load_script(DEPLOY / "render_nginx.py")


def outside_nodes_block(text: str) -> str:
    text = "\n".join(
        line for line in text.splitlines() if not line.startswith("# GENERATED") and "Only the" not in line
    )
    text = re.sub(r"listen \S+", "listen X", text)
    return re.sub(r"# BEGIN testpulse nodes\n.*?# END testpulse nodes", "NODES", text, flags=re.S).strip()


def test_rendered_configs_are_up_to_date_with_the_repository_nginx_conf():
    assert renderer().main(["--check"]) == 0, "run: .venv/bin/python deploy/render_nginx.py"


@pytest.mark.parametrize("name", RENDERED)
def test_rendered_config_differs_from_the_repository_only_in_nodes_and_listen(name):
    assert outside_nodes_block(RENDERED[name].read_text()) == outside_nodes_block(NGINX_CONF.read_text())


def localized(text: str, port: int = 18000) -> str:
    """The config with every node address on loopback and without `resolve`, which Debian's nginx
    (1.22) lacks; everything else is what the deployment runs."""
    text = re.sub(r" resolve\b", "", text)
    text = re.sub(r"resolver \S+", "resolver 127.0.0.1", text)
    return re.sub(r"server [a-z0-9.-]+:\d+", f"server 127.0.0.1:{port}", text)


@pytest.mark.parametrize("name", RENDERED)
def test_nginx_accepts_the_rendered_config(name, tmp_path: Path):
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    assert nginx is not None, "nginx is missing: ./scripts/setup installs it"
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr
    numbers = tuple(int(n) for n in re.findall(r"nginx/(\d+)\.(\d+)\.(\d+)", version)[0])
    text = RENDERED[name].read_text()
    text = localized(text) if numbers < (1, 27, 3) else re.sub(r"resolver \S+", "resolver 127.0.0.1", text)
    for sub in ("conf", "logs", "temp"):
        (tmp_path / sub).mkdir()
    temp_paths = "".join(f"{kind}_temp_path {tmp_path / 'temp' / kind};" for kind in ("client_body", "proxy"))
    (tmp_path / "conf" / "nginx.conf").write_text(text.replace("http {\n", f"http {{\n    {temp_paths}\n", 1))
    check = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", "conf/nginx.conf", "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr


def test_compose_proxy_routes_each_node_id_to_that_node_service():
    compose = yaml.safe_load(COMPOSE.read_text())
    conf = RENDERED["compose"].read_text()
    nodes = [name for name, service in compose["services"].items() if "TESTPULSE_NODE_ID" in str(service)]
    assert nodes
    for node in nodes:
        node_id = compose["services"][node]["environment"]["TESTPULSE_NODE_ID"]
        assert sid_tag(node_id) == node_id, "the node id must be usable as the sid tag"
        upstream = re.search(rf'"~\^{re.escape(node_id)}\\\."\s+(\S+);', conf)
        assert upstream, f"no route for sids of {node_id}"
        block = re.search(rf"upstream {upstream.group(1)} {{(.*?)}}", conf, re.S)
        assert block and f"server {node}:8000 resolve;" in block.group(1)
        assert f"server {node}:8000 resolve max_fails" in conf, f"{node} is not in the handshake pool"
    assert "listen 8080 " in conf


def test_kubernetes_proxy_routes_pod_names_to_pod_dns_names_of_the_headless_service():
    k8s = renderer().KUBERNETES
    statefulset = yaml.safe_load((K8S / "node-statefulset.yaml").read_text())
    service = yaml.safe_load((K8S / "node-service.yaml").read_text())
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    assert (k8s.statefulset, k8s.service, k8s.namespace) == (
        statefulset["metadata"]["name"],
        service["metadata"]["name"],
        namespace,
    )
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    pod = f"{k8s.statefulset}-12"
    assert sid_tag(pod) == pod, "pod names must be usable as sid tags"
    conf = RENDERED["kubernetes"].read_text()
    (pattern, target) = re.search(r'"~(\^\(\?<testpulse_pod>[^"]+)"\s+"([^"]+)";', conf).groups()
    match = re.match(pattern.replace("(?<", "(?P<").replace("\\\\", "\\"), f"{pod}.AbCdEf")
    assert match and match.group("testpulse_pod") == pod
    assert target == f"$testpulse_pod.{k8s.service_host}:8000"
    assert f"server {k8s.service_host}:8000 resolve" in conf
