"""The objectives gate: thresholds, what a run measured, and which objective held or failed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """Service-level objectives of one run. None switches an objective off."""

    connect_p99_ms: float | None = 2000.0
    delivery_p99_ms: float | None = 1000.0
    failure_ratio: float | None = 0.01
    max_gaps: float | None = 0
    max_duplicates: float | None = 0


@dataclass(frozen=True)
class Measured:
    connect_p99_ms: float | None
    delivery_p99_ms: float | None
    requests: int
    failures: int
    gaps: int
    duplicates: int
    # Things that make the run's numbers untrustworthy: unhandled exceptions in users, viewers that
    # never finished their delivery check, workers whose counters never arrived.
    problems: list[str] = field(default_factory=list)

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Result:
    name: str
    value: float | None
    limit: float | None
    ok: bool
    detail: str = ""

    def line(self) -> str:
        shown = "-" if self.value is None else _number(self.value)
        limit = "off" if self.limit is None else f"<= {_number(self.limit)}"
        verdict = "ok" if self.ok else "FAILED"
        extra = f"  ({self.detail})" if self.detail else ""
        return f"  {self.name:<18} {shown:>12}  {limit:<14} {verdict}{extra}"


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.1f}"


def _at_most(name: str, value: float | None, limit: float | None, missing: str = "no samples") -> Result:
    if limit is None:
        return Result(name, value, None, True)
    if value is None:
        return Result(name, None, limit, False, missing)
    return Result(name, value, limit, value <= limit)


def evaluate(thresholds: Thresholds, measured: Measured) -> list[Result]:
    """Every objective, in a fixed order. `completeness` (no unhandled errors, every viewer checked,
    every worker reported) is always on: without it the other numbers cannot be trusted."""
    results = [
        _at_most("connect_p99_ms", measured.connect_p99_ms, thresholds.connect_p99_ms),
        _at_most("delivery_p99_ms", measured.delivery_p99_ms, thresholds.delivery_p99_ms),
        _at_most(
            "failure_ratio",
            measured.failure_ratio if measured.requests else None,
            thresholds.failure_ratio,
            "no requests at all",
        ),
        _at_most("gaps", measured.gaps, thresholds.max_gaps),
        _at_most("duplicates", measured.duplicates, thresholds.max_duplicates),
    ]
    if measured.failures:
        results[2] = replace(results[2], detail=f"{measured.failures} of {measured.requests} requests failed")
    results.append(
        Result("completeness", len(measured.problems), 0, not measured.problems, "; ".join(measured.problems)[:400])
    )
    return results


def failed(results: list[Result]) -> list[Result]:
    return [r for r in results if not r.ok]


def report(results: list[Result]) -> str:
    lines = ["Service-level objectives:"] + [r.line() for r in results]
    bad = failed(results)
    if bad:
        names = ", ".join(f"{r.name} ({r.detail or _number(r.value or 0)})" for r in bad)
        lines.append(f"SLO FAILED: {len(bad)} objective(s) missed: {names}")
    else:
        lines.append("SLO passed: every objective held")
    return "\n".join(lines)


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def parse_limit(text: str) -> float | None:
    """A threshold from the command line: a number, or `off`."""
    if text.strip().lower() in ("off", "none", "-"):
        return None
    value = float(text)
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"threshold must be a number >= 0 or 'off', got {text!r}")
    return value
