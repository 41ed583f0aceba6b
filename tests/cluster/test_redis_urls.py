"""Every plain Redis URL form settings accept reaches a real redis-server: publish and subscribe through
the clients the broker builds (the Sentinel form: tests/faults/test_sentinel_failover.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.processes import HOST, RedisServer, free_port

from testpulse.bus.clients import RedisClients
from testpulse.settings import Settings

pytestmark = pytest.mark.cluster


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    # A short folder: a unix socket path must fit in 107 bytes.
    server = RedisServer(free_port(), tmp_path, extra_args=("--unixsocket", str(tmp_path / "r.sock")))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "form",
    ["redis://{host}:{port}/0", "valkey://{host}:{port}/0", "unix://{socket}?db=0", "redis://{host}:{port}"],
)
async def test_a_plain_redis_url_in_every_accepted_form_carries_pubsub(redis: RedisServer, form: str) -> None:
    url = form.format(host=HOST, port=redis.port, socket=redis.workdir / "r.sock")
    clients = RedisClients(Settings.from_env({"TESTPULSE_REDIS_URL": url}).redis_url or "", socket_timeout=2)
    listener, publisher = clients.new(), clients.new()
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe("testpulse:url-check")
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        assert await publisher.publish("testpulse:url-check", b"hello") == 1
        message = await pubsub.get_message(timeout=2)
        assert message is not None and message["data"] == b"hello"
        assert not clients.sentinel_managed and not await clients.master_moved(publisher)
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await publisher.aclose()
        await clients.close()
