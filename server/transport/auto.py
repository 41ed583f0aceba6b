"""Which transport a node runs, decided once, and the Engine.IO server and uvicorn protocol of each.

`TESTPULSE_TRANSPORT`, the way uvicorn picks an implementation behind `auto`:
  - `lean`: server/transport/lean.py and server/transport/wsprotocol.py, built on library internals
    (server/transport/internals.py lists them) for less memory and CPU per client;
  - `stock`: python-engineio's own sockets and queue, python-socketio's own dispatch and uvicorn's
    own WebSocket protocol, with our behaviour added through their public seams only;
  - `auto` (the default): lean when every internal it needs is there, else stock, with one warning
    line naming what is missing.
Both speak the same wire protocol; what only lean has is the write deadline (a peer that stops
reading is aborted after TESTPULSE_WRITE_TIMEOUT_SECONDS; stock leaves it to uvicorn and the PING
timeout) and several WebSocket messages per write; and a malformed Engine.IO frame or long-polling
body is python-engineio's to handle on stock (it logs a traceback; other clients are unharmed).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

from testpulse.transport import internals
from testpulse.transport.stock import TaggedEngineServer

log = logging.getLogger("testpulse.transport.auto")

Kind = Literal["lean", "stock"]


@functools.cache
def lean_missing() -> tuple[str, ...]:
    return tuple(internals.missing(internals.LEAN))


def select(choice: str) -> Kind:
    """The transport for TESTPULSE_TRANSPORT=`choice`; `auto` probes the libraries (once a process)."""
    if choice == "stock":
        return "stock"
    if choice == "lean":
        return "lean"
    absent = lean_missing()
    if absent:
        log.warning(
            "TESTPULSE_TRANSPORT=auto: running the stock transport, the installed libraries lack what the lean"
            " one needs: %s",
            "; ".join(absent),
        )
        return "stock"
    return "lean"


def engine_server_class(kind: Kind) -> type[TaggedEngineServer]:
    if kind == "stock":
        return TaggedEngineServer
    from testpulse.transport.lean import LeanEngineServer  # imports library internals: only when chosen

    return LeanEngineServer


def uvicorn_ws(kind: Kind) -> Any:
    """uvicorn's `ws=` for the transport: our protocol class, or uvicorn's own pick."""
    if kind == "stock":
        return "auto"
    from testpulse.transport.wsprotocol import LeanWebSocketProtocol

    return LeanWebSocketProtocol
