"""The metric catalogue: Prometheus naming, bounded labels, and docs/metrics.md in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram

from testpulse import metrics

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
UNBOUNDED_LABELS = {"session_id", "session", "sid", "sub", "user", "user_id", "token"}


def all_metrics() -> list[Counter | Gauge | Histogram]:
    return [v for v in vars(metrics).values() if isinstance(v, Counter | Gauge | Histogram)]


def test_every_metric_is_named_testpulse_with_a_help_text_and_bounded_labels() -> None:
    found = all_metrics()
    assert len(found) >= 25
    for metric in found:
        assert re.fullmatch(r"testpulse_[a-z0-9_]+", metric._name), metric._name
        assert metric._documentation.endswith("."), metric._name
        assert not UNBOUNDED_LABELS & set(metric._labelnames), metric._name
        if isinstance(metric, Histogram) and "seconds" not in metric._name:
            assert metric._name.endswith("_size"), metric._name


def test_docs_metrics_page_lists_exactly_the_metrics_of_the_code() -> None:
    assert metrics.reference() in DOC.read_text(), "docs/metrics.md is stale: regenerate with `testpulse metrics`"
