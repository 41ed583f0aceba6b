"""`python -m loadtests.bench.postgres_server`: the tests' throwaway PostgreSQL (initdb in a temp
dir, tuned for speed, proven gone on exit) for a benchmark, in a process of its own: it prints the
database URL on one line and stops the server when its stdin closes (its parent ended). A process
of its own because the benchmarks run on uvloop, whose subprocess support cannot start the server
as the `postgres` user, which initdb needs when we are root."""

from __future__ import annotations

import asyncio
import sys

from tests.support.processes import throwaway_postgres


async def serve(database: str) -> None:
    async with throwaway_postgres(database) as url:
        print(url, flush=True)
        await asyncio.to_thread(sys.stdin.read)  # returns at EOF: the parent closed it or died


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "bench"))
