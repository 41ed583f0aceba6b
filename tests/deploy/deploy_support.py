"""What the deploy checks share: repository paths, the metric names the code exposes, PromQL parsing,
kustomize rendering without kustomize, Docker-style file parsing."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
NGINX_CONF = ROOT / "nginx.conf"
OPERATIONS = ROOT / "docs" / "operations.md"


def load_script(path: Path) -> ModuleType:
    """Import one of deploy/'s scripts (they are not a package) by its path."""
    name = f"deploy_script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ---- metrics ------------------------------------------------------------------------------------


def exposed_metric_names() -> set[str]:
    """Every sample name a node can expose on /metrics: server/metrics.py's metrics with the
    suffixes prometheus_client adds, plus the default process_/python_ collectors."""
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary, generate_latest

    from testpulse import metrics

    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names |= {value._name + "_total", value._name + "_created"}
        elif isinstance(value, Histogram):
            names |= {value._name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")}
        elif isinstance(value, Summary):
            names |= {value._name + suffix for suffix in ("", "_sum", "_count", "_created")}
        elif isinstance(value, Gauge):
            names.add(value._name)
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            if name and name.group(0).startswith(("process_", "python_")):
                names.add(name.group(0))
    return names


# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}

_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, grouping label lists,
    ranges, function names and keywords removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of the dashboard, nested row panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for t in panel.get("targets", []):
                if t.get("expr"):
                    yield panel.get("title", "?"), t["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])


def label_values_metric(query: str) -> str | None:
    match = re.match(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", query)
    return match.group(1) if match else None


# ---- kustomize ------------------------------------------------------------------------------------


def _configmap_hash(data: dict[str, str]) -> str:
    """kustomize's ConfigMap name suffix: sha256 of the encoded object, first 10 hex chars mapped
    to kustomize's alphabet (used only to make names unique, as kustomize does)."""
    encoded = json.dumps({"data": data, "kind": "ConfigMap", "name": ""}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """A small kustomize for what deploy/k8s uses: resources, namespace, labels (never on selectors,
    on pod templates when asked), configMapGenerator (literals and files, labels in its options, with a
    name hash and references rewritten) and images. kubectl's kustomize, where installed, must agree with it."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images"}
    unknown = set(kustomization) - known
    if unknown:
        raise ValueError(f"the test renderer does not support {sorted(unknown)}; extend it")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        resources += load_yaml_documents(directory / entry)
    renamed: dict[str, str] = {}
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for spec in generator.get("files", []):
            key, _, source = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[key] = (directory / source).read_text()
        options = generator.get("options", {})
        if set(options) - {"labels"}:
            raise ValueError(f"the test renderer supports only labels in generator options, not {sorted(options)}")
        name = f"{generator['name']}-{_configmap_hash(data)}"
        renamed[generator["name"]] = name
        metadata = {"name": name, **({"labels": dict(options["labels"])} if "labels" in options else {})}
        resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    namespace = kustomization.get("namespace")
    labels: dict[str, str] = {}
    template_labels: dict[str, str] = {}
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors"):
            raise ValueError("the test renderer does not support includeSelectors: true")
        labels.update(entry["pairs"])
        if entry.get("includeTemplates"):
            template_labels.update(entry["pairs"])
    images = {image["name"]: image for image in kustomization.get("images", [])}
    for resource in resources:
        meta = resource.setdefault("metadata", {})
        if namespace and resource["kind"] != "Namespace":
            meta["namespace"] = namespace
        meta.setdefault("labels", {}).update(labels)
        template = resource.get("spec", {}).get("template")
        if template:
            template.setdefault("metadata", {}).setdefault("labels", {}).update(template_labels)
            pod = template["spec"]
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                repo, _, tag = container["image"].partition(":")
                if repo in images:
                    image = images[repo]
                    container["image"] = f"{image.get('newName', repo)}:{image.get('newTag', tag)}"
                for source in container.get("envFrom", []):
                    ref = source.get("configMapRef")
                    if ref and ref["name"] in renamed:
                        ref["name"] = renamed[ref["name"]]
            for volume in pod.get("volumes", []):
                ref = volume.get("configMap")
                if ref and ref["name"] in renamed:
                    ref["name"] = renamed[ref["name"]]
    return resources


def find(resources: list[dict[str, Any]], kind: str, name_prefix: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"].startswith(name_prefix)]
    assert len(matches) == 1, f"expected one {kind} named {name_prefix}*, found {len(matches)}"
    return matches[0]


# ---- Dockerfile and .dockerignore ---------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    stage: int
    keyword: str
    args: str


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, args.strip()))
    return out


def exec_form(args: str) -> list[str]:
    """The argv of an exec-form (JSON) instruction, or the shell form split like sh would."""
    args = args.strip()
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return shlex.split(args)


def dockerignore_excludes(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip().strip("/")
        if any(_docker_match(body, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def _docker_match(pattern: str, path: str) -> bool:
    if pattern == "**":
        return True
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return re.fullmatch(regex, path) is not None


def dockerignore_patterns(path: Path = ROOT / ".dockerignore") -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# ---- the code's own endpoints ---------------------------------------------------------------------


def http_routes() -> set[str]:
    """Paths of the HTTP routes a node serves (GET /health, /ready, /metrics, the API)."""
    from testpulse.app import create_app
    from testpulse.settings import Settings

    # Building the app opens no database; the file is never created.
    app = create_app(Settings.from_env({}, database_url="sqlite+aiosqlite:///unused-by-route-listing.db"))
    return {route.path for route in app.node.http.routes()}


def serve_port(argv: list[str]) -> int:
    """The port of a `testpulse serve ...` command line, parsed by the real CLI."""
    from testpulse.cli import parser

    assert argv[0] == "testpulse", argv
    args = parser().parse_args(argv[1:])
    assert args.command == "serve", argv
    return int(args.port)
