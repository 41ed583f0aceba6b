"""A testpulse node that drops every tenth detection_event on each WebSocket. Test-only fault
injection (never part of server/): it proves that the load tests' loss check and gate fail.

    python tests/loadtests/lossy_node.py serve --host 127.0.0.1 --port 8101

It is `testpulse serve` with its ASGI app wrapped: frames leave the node as Engine.IO text
messages (one per `websocket.send`, or several per SEND_BATCH), and a Socket.IO event frame starts
with `42["<event>"`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import testpulse.app  # noqa: E402
from testpulse import cli  # noqa: E402
from testpulse.settings import Settings  # noqa: E402
from testpulse.transport.wsprotocol import SEND_BATCH  # noqa: E402

DROP_EVERY = 10
DETECTION_FRAME = '42["detection_event"'


def lossy(app: Any, every: int = DROP_EVERY) -> Any:
    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await app(scope, receive, send)
            return
        seen = 0

        def keep(text: Any) -> bool:
            nonlocal seen
            if isinstance(text, str) and text.startswith(DETECTION_FRAME):
                seen += 1
                return seen % every != 0
            return True

        async def send_most(message: dict[str, Any]) -> None:
            if message.get("type") == "websocket.send" and not keep(message.get("text")):
                return
            if message.get("type") == SEND_BATCH:
                message = {**message, "messages": [m for m in message["messages"] if keep(m)]}
            await send(message)

        await app(scope, receive, send_most)

    wrapped.node = app.node  # type: ignore[attr-defined]  # what `testpulse serve` drains on SIGTERM
    return wrapped


def main() -> int:
    real = testpulse.app.create_app

    def create_lossy_app(settings: Settings) -> Any:
        return lossy(real(settings))

    testpulse.app.create_app = create_lossy_app  # cmd_serve imports it when it runs
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
