"""The wheel carries copies of files whose source stays at the repository's top (nginx.conf and the
Prometheus config): `testpulse cluster` reads the copies, so they must be the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from testpulse.devtools.cluster import NGINX_CONF, PROMETHEUS_DIR

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COPIES = [
    (ROOT / "nginx.conf", NGINX_CONF),
    (ROOT / "deploy" / "prometheus" / "prometheus.yml", PROMETHEUS_DIR / "prometheus.yml"),
    (ROOT / "deploy" / "prometheus" / "alerts.yml", PROMETHEUS_DIR / "alerts.yml"),
]


@pytest.mark.parametrize(("source", "bundled"), COPIES, ids=[source.name for source, _ in COPIES])
def test_bundled_copy_is_identical_to_its_source(source: Path, bundled: Path) -> None:
    assert bundled.read_bytes() == source.read_bytes(), (
        f"{bundled} differs from {source.relative_to(ROOT)}; after editing the source, copy it: cp {source} {bundled}"
    )
