"""What the node and cluster benchmarks share: fan-out measurement windows, tables, result files,
and an optional py-spy profile of a node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.bench.loadgen import Pool
from loadtests.bench.publisher import Publisher
from loadtests.bench.systems import REPO_ROOT, load_average
from loadtests.bench.wire import WireClient, merge_sparse, percentiles

DEFAULT_OUT = REPO_ROOT / "loadtests" / "bench" / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", file=sys.stderr, flush=True)


# ---- fan-out windows -------------------------------------------------------------------------


async def wait_delivered(
    pool: Pool, targets: dict[str, int], within: float, probes: Sequence[WireClient] = ()
) -> tuple[bool, float]:
    """Wait until every open viewer has seen the target seq of its session. Returns (done, seconds)."""
    started = time.monotonic()
    while True:
        progress = await pool.progress()
        low = progress["low"]
        done = all(low.get(s, target) >= target for s, target in targets.items())
        for probe in probes:
            if not probe.closed and probe.viewer is not None and probe.viewer.session_id in targets:
                done = done and probe.viewer.last_seq >= targets[probe.viewer.session_id]
        waited = time.monotonic() - started
        if done or waited >= within:
            return done, waited
        await asyncio.sleep(0.05)


async def wait_quiet(pool: Pool, within: float, quiet: float = 1.0) -> tuple[bool, float]:
    """Wait until the viewers have received nothing new for `quiet` seconds (a backlog still
    draining, including seqs whose acks never came). Returns (quiet, seconds waited)."""
    started = time.monotonic()
    last = (await pool.progress())["received"]
    still_since = time.monotonic()
    while time.monotonic() - started < within:
        await asyncio.sleep(0.25)
        now = (await pool.progress())["received"]
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return True, time.monotonic() - started
    return False, time.monotonic() - started


async def window_result(
    pool: Pool,
    publisher: Publisher,
    base_seq: dict[str, int],
    duration: float,
    probes: Sequence[WireClient] = (),
) -> dict[str, Any]:
    """Merge what the viewers saw since the last reset against what the publisher got acked."""
    stats = await pool.stats()
    viewers = list(stats["viewers"])
    hists = [stats["hist"]]
    received = stats["received"]
    frames = stats["frames"]
    first_at, last_at = stats["first_at"], stats["last_at"]
    reasons: Counter[str] = Counter(stats["close_reasons"])
    errors: Counter[str] = Counter(stats["errors"])
    for probe in probes:
        v, r = probe.viewer, probe.receiver
        if v is None or r is None:
            continue
        viewers.append((v.session_id, v.count, v.out_of_order, v.duplicates, v.last_seq, probe.closed))
        hists.append(r.hist.sparse())
        received += r.total
        frames += r.frames
        if r.first_at:
            first_at = min(first_at, r.first_at) if first_at else r.first_at
        last_at = max(last_at, r.last_at)
        errors.update(probe.errors)
        if probe.closed:
            reasons[probe.close_reason or "unknown"] += 1
    # The last seq of a session: the highest acked, or higher when acks never came but viewers saw
    # later seqs (seqs are consecutive, so everything up to the highest seen was assigned).
    last: dict[str, int] = dict(publisher.max_seq)
    for session_id, _count, _ooo, _dups, seen, _closed in viewers:
        last[session_id] = max(last.get(session_id, 0), seen)
    expected_total = lost = out_of_order = duplicates = viewers_with_loss = closed = 0
    for session_id, count, ooo, dups, _last, was_closed in viewers:
        expected = last.get(session_id, 0) - base_seq.get(session_id, 0)
        missing = max(0, expected - (count - dups))
        expected_total += expected
        lost += missing
        out_of_order += ooo
        duplicates += dups
        viewers_with_loss += 1 if missing else 0
        closed += 1 if was_closed else 0
    span = last_at - first_at if last_at > first_at else 0.0
    return {
        "viewers": len(viewers),
        "viewers_closed": closed,
        "close_reasons": dict(reasons),
        "error_events": dict(errors),
        "deliveries": received,
        "frames": frames,
        "deliveries_expected": expected_total,
        "deliveries_per_s": round(received / duration, 1) if duration > 0 else None,
        "deliveries_per_s_active": round(received / span, 1) if span > 0 else None,
        "lost": lost,
        "viewers_with_loss": viewers_with_loss,
        "out_of_order": out_of_order,
        "duplicates": duplicates,
        "latency_ms": percentiles(merge_sparse(hists)),
    }


def probe_viewer(url: str, session_id: str) -> WireClient:
    from loadtests.bench.wire import Receiver, ViewerState

    return WireClient(url, Receiver(), ViewerState(session_id))


# ---- output ----------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "-+-".join("-" * w for w in widths)
    body = [
        " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells
    ]
    return "\n".join([line, rule, *body])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace("-", "").isdigit()


def environment() -> dict[str, Any]:
    import aiohttp
    import engineio
    import socketio

    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    return {
        "command": " ".join(["python -m loadtests.bench", *sys.argv[1:]]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": locals().get("commit"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": load_average(),
        "versions": {
            "python-socketio": getattr(socketio, "__version__", "?"),
            "python-engineio": getattr(engineio, "__version__", "?"),
            "aiohttp": aiohttp.__version__,
        },
    }


def save(out_dir: Path, name: str, document: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


# ---- profiling -------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    return found or os.environ.get("PY_SPY")


class Profile:
    """`py-spy record` of one process for a few seconds (raw collapsed stacks), summarised.

    `gil`: only the samples of a thread that holds the GIL, which is the process's Python CPU. Without
    it py-spy also counts some waits as work (the event loop's epoll, a worker thread's queue.get),
    so shares read as wall time; with it, C code that releases the GIL (sqlite3's own work) is left
    out. The loop's socket writes hold the GIL (uvloop calls send() with it held), so they stay in."""

    def __init__(self, pid: int, seconds: float, out: Path, *, gil: bool = False) -> None:
        self.out = out
        binary = py_spy_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        if binary is None:
            log("py-spy not found (pip install py-spy, or set PY_SPY): no profile")
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *(binary, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"),
                *("--format", "raw", "--threads", "--output", str(out), "--nonblocking"),
                *(["--gil"] if gil else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self, top: int = 15) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        if not self.out.exists():
            return {"error": err.decode(errors="replace")[-300:]}
        return summarise_collapsed(self.out.read_text(), top) | {"file": str(self.out)}


def summarise_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        if frames and frames[0].startswith("thread "):
            threads[_thread_name(frames.pop(0), frames)] += count
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = lambda c: round(100.0 * c / total, 1) if total else 0.0  # noqa: E731
    return {
        "samples": total,
        "threads_pct": [(t, share(c)) for t, c in threads.most_common()],
        "self_pct": [(f, share(c)) for f, c in own.most_common(top)],
        "inclusive_pct": [(f, share(c)) for f, c in inclusive.most_common(top * 2)],
    }


def _thread_name(root: str, frames: list[str]) -> str:
    """The event loop thread, or the kind of worker thread (aiosqlite, executor) from its frames."""
    joined = " ".join(frames)
    if "aiosqlite" in joined:
        return "aiosqlite thread"
    if "Runner.run" in joined or "run_until_complete" in joined or "<module>" in joined:
        return "event loop (main thread)"
    return "other thread"


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"
