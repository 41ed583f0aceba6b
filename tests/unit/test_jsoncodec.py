"""jsoncodec: orjson's speed with the stdlib's answers, at the edges where the two differ."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testpulse import jsoncodec

pytestmark = pytest.mark.unit


def stdlib_loads(text: str) -> Any:
    return json.loads(text, parse_int=jsoncodec._bounded_int)


@pytest.mark.parametrize(
    "text",
    [
        '{"attributes":{"big":123456789012345678901234567890,"neg":-98765432109876543210987}}',
        '{"id":"12345678901234567890123"}',  # digits in a string: same value either way
        "18446744073709551615",  # the largest 64-bit unsigned integer
        '{"confidence":NaN}',
        '{"ts":Infinity}',
        '["\\ud800"]',
        '{"label":"caf\\u00e9","x":-0.0,"y":1.5e-7,"z":1e16}',
        '[1,[2,[3,{"a":null,"b":true}]]]',
    ],
)
def test_loads_reads_every_value_as_the_stdlib_does(text: str) -> None:
    got, expected = jsoncodec.loads(text), stdlib_loads(text)
    assert repr(got) == repr(expected)  # repr: NaN != NaN, and 1 == 1.0 would hide a float
    assert repr(jsoncodec.loads(text.encode())) == repr(expected)


def test_loads_keeps_python_engineios_bound_on_integer_length() -> None:
    with pytest.raises(ValueError, match="too large"):
        jsoncodec.loads("1" * 101)
    assert jsoncodec.loads("9" * 100) == int("9" * 100)


def test_loads_refuses_what_the_stdlib_refuses() -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads('{"a":')


@pytest.mark.parametrize(
    "value",
    [
        {"session_id": "s1", "seq": 1, "label": "café", "bbox": [0.5, 1e-7, 3.0, 4.0], "attributes": None},
        {"huge": 2**70, "negative": -(2**80)},
        {1: "a non-string key"},
        ["detection_event", {"seq": 9007199254740993, "ts": 1733500000123.5}],
        ["error", {"label": "\ud800"}],  # a lone surrogate a client sent as an escape: orjson refuses it
    ],
)
def test_dumps_writes_the_same_json_value_as_the_stdlib(value: Any) -> None:
    text = jsoncodec.dumps(value, separators=(",", ":"))
    assert isinstance(text, str)
    assert stdlib_loads(text) == stdlib_loads(json.dumps(value))
    assert jsoncodec.dumps_bytes(value) == text.encode()


def test_socketio_packets_round_trip_through_the_codec() -> None:
    import socketio.packet

    class Packet(socketio.packet.Packet):  # type: ignore[misc]
        json = jsoncodec

    data = ["detection_event", {"seq": 3, "attributes": {"n": 123456789012345678901234567890, "é": [1, 2]}}]
    encoded = Packet(socketio.packet.EVENT, namespace="/", data=data).encode()
    decoded = Packet(encoded_packet=encoded)
    assert decoded.data == data


def test_a_feed_packet_decodes_as_python_socketios_own_encoding_of_the_event() -> None:
    import socketio.packet

    from testpulse.realtime.feeds import feed_packet

    data = {"session_id": "s", "seq": 7, "label": "café", "bbox": [1, 2.5, 3, 4], "attributes": {"k": [None, True]}}
    ours = feed_packet("detection_event", data)
    stock = socketio.packet.Packet(socketio.packet.EVENT, namespace="/", data=["detection_event", data]).encode()
    assert ours.packet_type == 4  # Engine.IO MESSAGE
    assert socketio.packet.Packet(encoded_packet=ours.data).data == socketio.packet.Packet(encoded_packet=stock).data
    assert ours.data[0] == stock[0] == "2"


def test_a_lone_surrogate_is_written_as_its_escape_as_the_stdlib_does() -> None:
    assert jsoncodec.dumps(["\ud800"]) == '["\\ud800"]'
    assert jsoncodec.loads(jsoncodec.dumps_bytes({"label": "\ud800"})) == {"label": "\ud800"}
