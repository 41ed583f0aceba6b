"""`store`: the Database seam's detection paths in process, without sockets: CPU per stored and read detection.

The node benchmark measures these through a node and its clients, where they are a fraction of
the cost; this one runs `append_many` (the group commit's call) and `since` (replay) straight on
an opened database, so a change to the SQL paths or the row conversions shows in its figures.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testpulse.domain.protocol import DetectionIn
from testpulse.domain.sessions import Session, Status, utcnow
from testpulse.store.auto import open_database
from testpulse.store.database import Database
from testpulse.store.repository import SqlStore
from testpulse.urls import normalise_database_url


@dataclass(frozen=True)
class Phase:
    name: str
    sessions: int  # sessions in each group commit
    per_request: int  # detections per request
    requests: int  # requests in each group commit
    with_ids: bool


PHASES = [
    Phase("1 request x 1", 1, 1, 1, False),
    Phase("1 request x 100", 1, 100, 1, False),
    Phase("50 requests x 1, 10 sessions", 10, 1, 50, False),
    Phase("50 requests x 1, 10 sessions, ids", 10, 1, 50, True),
]


def _item(n: int, with_id: bool) -> DetectionIn:
    return DetectionIn(
        "car",
        0.87,
        [0.1, 0.2, 0.3, 0.4],
        n,
        1_764_000_000_000 + n,
        {"camera": "cam-1", "track": n},
        f"d-{secrets.token_hex(6)}" if with_id else None,
    )


async def _sessions(store: SqlStore, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        now = utcnow()
        session_id = f"bench-{secrets.token_hex(4)}"
        await store.create(Session(session_id, session_id, Status.CREATED, now, now, 0), "bench")
        await store.change_status(session_id, Status.CREATED, Status.RUNNING, "bench", None)
        ids.append(session_id)
    return ids


async def _append_phase(db: Database, store: SqlStore, phase: Phase, detections: int) -> dict[str, Any]:
    sessions = await _sessions(store, phase.sessions)
    per_commit = phase.requests * phase.per_request
    commits = max(1, detections // per_commit)
    n = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(commits):
        requests = []
        for r in range(phase.requests):
            items = [_item(n + k, phase.with_ids) for k in range(phase.per_request)]
            n += phase.per_request
            requests.append((sessions[r % phase.sessions], items))
        await db.append_many(requests, utcnow())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stored = commits * per_commit
    return {"phase": phase.name, "detections": stored, "cpu_us": cpu / stored * 1e6, "wall_us": wall / stored * 1e6}


async def _since_phase(db: Database, store: SqlStore, rows: int, page: int) -> dict[str, Any]:
    (session_id,) = await _sessions(store, 1)
    for start in range(0, rows, 500):
        await db.append_many([(session_id, [_item(start + k, True) for k in range(500)])], utcnow())
    read = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(5):
        after = 0
        while page_rows := await db.since(session_id, after, page):
            read += len(page_rows)
            after = page_rows[-1].seq
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "phase": f"since, pages of {page}",
        "detections": read,
        "cpu_us": cpu / read * 1e6,
        "wall_us": wall / read * 1e6,
    }


async def run(args: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="tp-store-bench-") as tmp:
        url = (
            f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}" if args.db == "sqlite" else normalise_database_url(args.db)
        )
        db = open_database(url)
        try:
            await db.migrate(automatic=True)
            store = SqlStore(db)
            results = []
            for _ in range(args.rounds):
                for phase in PHASES:
                    results.append(await _append_phase(db, store, phase, args.detections))
                results.append(await _since_phase(db, store, args.detections, 500))
        finally:
            await db.close()
    best: dict[str, dict[str, Any]] = {}
    for row in results:
        if row["phase"] not in best or row["cpu_us"] < best[row["phase"]]["cpu_us"]:
            best[row["phase"]] = row
    print(f"store bench on {'sqlite' if args.db == 'sqlite' else 'postgresql'}, load {os.getloadavg()[0]:.2f}")
    print(f"best of {args.rounds} rounds   {'phase':<38} {'rows':>7} {'CPU us/row':>11} {'wall us/row':>12}")
    for row in best.values():
        print(f"{'':<17}{row['phase']:<38} {row['detections']:>7} {row['cpu_us']:>11.1f} {row['wall_us']:>12.1f}")


def register(commands: Any) -> None:
    p = commands.add_parser("store", help="the store's append and replay paths in process: CPU per detection")
    p.add_argument(
        "--db", default="sqlite", help="sqlite (a temp file, default), postgres (a throwaway server) or a URL"
    )
    p.add_argument("--detections", type=int, default=5000, help="detections per phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the best of each phase is shown")
    p.set_defaults(run=run)
