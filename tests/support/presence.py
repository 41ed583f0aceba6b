"""Presence from the tests' side: clients with a token for a chosen sub, and what their presence_updates add up to."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from support.client import Client
from support.cluster import RunningCluster

ConnectAs = Callable[..., Awaitable[Client]]
"""connect_as(url, sub, role="viewer") -> a connected Client (it has its connection_status) for `sub`."""


@asynccontextmanager
async def clients_as(cluster: RunningCluster) -> AsyncIterator[ConnectAs]:
    clients: list[Client] = []

    async def make(url: str, sub: str, role: str = "viewer") -> Client:
        client = Client(sub)
        clients.append(client)
        await client.connect(url, token=cluster.token(role, sub=sub))
        await client.wait_for_event("connection_status")
        return client

    try:
        yield make
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


def subs_seen(client: Client, session_id: str) -> set[str]:
    """The set of subs a client's presence_updates of one session add up to."""
    held: set[str] = set()
    for update in client.presence(session_id):
        held |= {m["sub"] for m in update["joined"]}
        held -= {m["sub"] for m in update["left"]}
    return held


async def join(client: Client, session_id: str, presence: bool = True) -> None:
    await client.ok("join_session", {"session_id": session_id, "presence": presence})


async def new_session(cluster: RunningCluster, url: str | None = None) -> str:
    async with httpx.AsyncClient(
        base_url=url or cluster.proxy, headers=cluster.headers("operator"), timeout=10
    ) as http:
        created = await http.post("/api/sessions", json={"name": "presence"})
        assert created.status_code == 201, created.text
        return str(created.json()["session"]["id"])


async def presence_at(url: str, cluster: RunningCluster, session_id: str) -> dict[str, Any]:
    """GET /api/sessions/{id}/presence on one node (or the proxy)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get(f"/api/sessions/{session_id}/presence", headers=cluster.headers("viewer"))
    assert response.status_code == 200, response.text
    return dict(response.json()["presence"])
