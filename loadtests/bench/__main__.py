"""`python -m loadtests.bench node|cluster|churn|capacity-costs|capacity-check|store|connections`: benchmark commands
(see loadtests/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from loadtests.bench import (
    capacity_check,
    capacity_costs,
    churn_bench,
    cluster_bench,
    connections,
    node_bench,
    store_bench,
)
from loadtests.bench.loadgen import install_uvloop, raise_fd_limit
from loadtests.bench.postgres import throwaway_postgres


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    node_bench.register(commands)
    cluster_bench.register(commands)
    churn_bench.register(commands)
    capacity_costs.register(commands)
    capacity_check.register(commands)
    store_bench.register(commands)
    connections.register(commands)
    args = parser.parse_args(argv)
    raise_fd_limit()
    install_uvloop()
    with contextlib.ExitStack() as stack:
        if getattr(args, "db", None) == "postgres":
            args.db = stack.enter_context(throwaway_postgres())
        asyncio.run(args.run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
