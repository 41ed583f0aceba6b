"""asgi_environ: the environ Engine.IO reads, from an ASGI scope and body."""

from __future__ import annotations

from typing import Any

import pytest

from testpulse.transport.lean import asgi_environ

pytestmark = pytest.mark.unit


def receiver(*events: dict[str, Any]) -> Any:
    queue = list(events)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/socket.io/",
    "query_string": b"EIO=4&transport=polling&sid=node1.abc",
    "headers": [
        (b"content-type", b"text/plain"),
        (b"content-length", b"11"),
        (b"authorization", b"Bearer t"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-for", b"10.0.0.2"),
        (b"x-bad", b"\xff"),
    ],
}


async def test_the_environ_carries_method_query_and_headers() -> None:
    environ = await asgi_environ(SCOPE, receiver({"type": "http.request", "body": b""}), None)
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["QUERY_STRING"] == "EIO=4&transport=polling&sid=node1.abc"
    assert environ["RAW_URI"] == "/socket.io/?EIO=4&transport=polling&sid=node1.abc"
    assert environ["CONTENT_TYPE"] == "text/plain" and environ["CONTENT_LENGTH"] == "11"
    assert environ["HTTP_AUTHORIZATION"] == "Bearer t"
    assert environ["HTTP_X_FORWARDED_FOR"] == "10.0.0.1,10.0.0.2"  # repeated headers are joined
    assert "HTTP_X_BAD" not in environ  # undecodable values are skipped
    assert environ["asgi.scope"] is SCOPE


async def test_a_body_in_several_messages_is_read_whole_or_by_length() -> None:
    receive = receiver(
        {"type": "http.request", "body": b"hello", "more_body": True},
        {"type": "http.request", "body": b" world", "more_body": False},
    )
    environ = await asgi_environ(SCOPE, receive, None)
    body = environ["wsgi.input"]
    assert await body.read(5) == b"hello"
    assert await body.read() == b" world"
    assert await body.read() == b""


async def test_other_events_give_an_empty_environ() -> None:
    assert await asgi_environ(SCOPE, receiver({"type": "http.disconnect"}), None) == {}
