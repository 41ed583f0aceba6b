"""WireMessage: an Engine.IO packet's WebSocket bytes, encoded once for every client."""

from __future__ import annotations

import pytest
from engineio import packet
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from testpulse.transport.wiremessage import WireMessage, wire_message

pytestmark = pytest.mark.unit


def parse(frame: bytes) -> Frame:
    """A frame read back as a client reads a server's (unmasked) frames."""
    reader = StreamReader()
    reader.feed_data(frame)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        parsed: Frame = done.value
        return parsed
    raise AssertionError("the frame was incomplete")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])  # every length encoding
def test_the_frame_reads_back_as_one_final_text_frame_of_the_payload(size: int) -> None:
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    frame = parse(WireMessage(payload).frame)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)


def test_a_binary_message_is_a_binary_frame() -> None:
    frame = parse(WireMessage(b"\x00\x01", binary=True).frame)
    assert (frame.opcode, frame.data) == (Opcode.BINARY, b"\x00\x01")


def test_a_packet_is_encoded_once_and_as_engineio_encodes_it() -> None:
    pkt = packet.Packet(packet.MESSAGE, '2["detection_event",{"seq":1}]')
    message = wire_message(pkt)
    assert message.payload == pkt.encode().encode() == b'42["detection_event",{"seq":1}]'
    assert not message.binary
    assert wire_message(pkt) is message
    assert message.frame is message.frame  # built once


def test_a_binary_packet_keeps_its_bytes() -> None:
    message = wire_message(packet.Packet(packet.MESSAGE, b"\x04raw"))
    assert (message.payload, message.binary) == (b"\x04raw", True)
