"""Why a node ends a connection, and what the client is told to do next (PROTOCOL.md 1.1).

Every server-initiated disconnect is one of these values, so the error code on the wire, the
reconnect advice, whether a Socket.IO DISCONNECT packet is sent and the metric label cannot drift
apart between handlers.

The DISCONNECT packet is what decides a client's behaviour: socket.io-client (and python-socketio)
treat it as "the server does not want you" and never reconnect by themselves. So a reason whose
advice is `auto` ends only the Engine.IO transport, and without Engine.IO's CLOSE packet either
(python-engineio's client treats that one as final too): the WebSocket is closed, a long-poll gets
the error and then a 400, and the client's own reconnection brings it back (through the proxy, to
a node that has room). `refresh` and `no` send the DISCONNECT, so a client does not retry a dead
token or a refused session in a loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reconnect(enum.StrEnum):
    AUTO = "auto"  # the client's own reconnection brings it back; rejoin with last_seq
    REFRESH = "refresh"  # reconnect with a fresh token
    NO = "no"  # ask the user


@dataclass(frozen=True, slots=True)
class DisconnectReason:
    code: str  # the `error` event's code
    reconnect: Reconnect
    message: str
    label: str  # the metric label (testpulse_server_disconnects_total{reason})

    @property
    def sends_disconnect_packet(self) -> bool:
        return self.reconnect is not Reconnect.AUTO

    def error_event(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "reconnect": self.reconnect.value}


SERVER_DRAINING = DisconnectReason(
    "server_draining", Reconnect.AUTO, "this node is shutting down; reconnect and rejoin with last_seq", "draining"
)
SLOW_CONSUMER = DisconnectReason(
    "slow_consumer", Reconnect.AUTO, "your queue overflowed; reconnect and rejoin with last_seq", "slow_consumer"
)
AUTH_EXPIRED = DisconnectReason(
    "auth_expired", Reconnect.REFRESH, "token has expired; reconnect with a fresh one", "auth_expired"
)
FORBIDDEN = DisconnectReason("forbidden", Reconnect.NO, "this token may no longer use this connection", "forbidden")
AUTH_INVALID = DisconnectReason("auth_invalid", Reconnect.NO, "token is no longer valid", "auth_invalid")

ALL: tuple[DisconnectReason, ...] = (SERVER_DRAINING, SLOW_CONSUMER, AUTH_EXPIRED, FORBIDDEN, AUTH_INVALID)
