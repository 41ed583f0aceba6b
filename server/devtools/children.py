"""Child processes of the local cluster: where their binaries are, free ports, dying with the parent."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
from pathlib import Path

PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def find_binary(name: str, *extra_dirs: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/bin", *extra_dirs):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    raise ClusterError(f"{name} not found: run ./scripts/setup (it installs the Debian package)")


def die_with_parent() -> None:
    # Children of a cluster that is SIGKILLed must not outlive it (no orphans, ever).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
