"""An outgoing Engine.IO packet as WebSocket bytes, encoded once for every client it goes to.

The delivery feeds put one packet object in the queue of every viewer of a session. Encoding it
(Engine.IO text, UTF-8, a WebSocket frame) per viewer repeats the same work a hundred times per
detection; the first viewer's writer encodes it and keeps the result on the packet, the others
reuse it. A server's frames are not masked, so the frame is the same bytes for every client that
negotiated no extension (permessage-deflate compresses per connection: those go through their own
websockets protocol instead, from `payload`).
"""

from __future__ import annotations

from typing import Any

from websockets.frames import Frame, Opcode

_CACHE = "_testpulse_wire"  # the attribute a packet keeps its WireMessage in


class WireMessage:
    """One WebSocket message: its payload, and (built on first use) its unmasked frame."""

    __slots__ = ("_frame", "binary", "payload")

    def __init__(self, payload: bytes, binary: bool = False) -> None:
        self.payload = payload
        self.binary = binary
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        """The message as a server sends it on a connection without extensions (RFC 6455 5.2)."""
        if self._frame is None:
            opcode = Opcode.BINARY if self.binary else Opcode.TEXT
            self._frame = Frame(opcode, self.payload).serialize(mask=False)
        return self._frame


def wire_message(pkt: Any) -> WireMessage:
    """The WireMessage of an Engine.IO packet, made on the first call and kept on the packet (a
    packet is never changed once it is queued)."""
    message: WireMessage | None = pkt.__dict__.get(_CACHE)
    if message is None:
        encoded = pkt.encode()
        if isinstance(encoded, bytes):
            message = WireMessage(encoded, binary=True)
        else:
            message = WireMessage(encoded.encode(), binary=False)
        setattr(pkt, _CACHE, message)
    return message
