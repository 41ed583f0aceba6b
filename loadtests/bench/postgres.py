"""`--db postgres`: a throwaway PostgreSQL for one benchmark run, with production durability.

initdb into a temp dir, then `postgres` on a free loopback port with its defaults: fsync and
synchronous_commit on, so an ack still waits for its commit to reach the disk, as in production
(the test suite's server turns both off for speed; a benchmark must not). Stopped and deleted
when the run ends; the server dies with the benchmark if that is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from testpulse.devtools.cluster import ClusterError, free_port

PR_SET_PDEATHSIG = 1
MAX_CONNECTIONS = 200


def bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ClusterError("PostgreSQL binaries not found: run ./scripts/setup (it installs postgresql)")
    return Path(initdb).parent


def _as_owner(uid: int | None, gid: int | None) -> Callable[[], None]:
    """Before exec: become the data folder's owner (initdb refuses root), then die with the parent
    (set after the change of user, which clears it)."""

    def prepare() -> None:
        if gid is not None and uid is not None:
            os.setgid(gid)
            os.setuid(uid)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return prepare


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Yield a `postgresql://` URL of a fresh `bench` database on a private server."""
    binaries = bindir()
    workdir = Path(tempfile.mkdtemp(prefix="tp-bench-pg-"))
    uid = gid = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        uid, gid = owner.pw_uid, owner.pw_gid
        os.chown(workdir, uid, gid)
    data, port = workdir / "data", free_port()
    log = open(workdir / "postgres.log", "ab")  # noqa: SIM115 - lives as long as the server
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C"],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_as_owner(uid, gid),
            check=True,
        )
        settings = {"listen_addresses": "127.0.0.1", "max_connections": str(MAX_CONNECTIONS)}
        options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        server = subprocess.Popen(
            [binaries / "postgres", "-D", data, "-p", str(port), "-k", workdir, *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_as_owner(uid, gid),
        )
        psql = [binaries / "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-q"]
        deadline = time.monotonic() + 30
        while subprocess.run([*psql, "-c", "SELECT 1"], capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"PostgreSQL did not start; see {workdir / 'postgres.log'}")
            time.sleep(0.2)
        subprocess.run([*psql, "-c", "CREATE DATABASE bench"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/bench"
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # "fast" shutdown: does not wait for clients to leave
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
