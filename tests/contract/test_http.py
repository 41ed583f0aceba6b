"""The HTTP API: health, readiness, metrics, and the same sessions, state machine and detections as Socket.IO."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from support.client import detection
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.contract


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


async def create(http: httpx.AsyncClient, node: NodeUnderTest, **body: Any) -> dict[str, Any]:
    response = await http.post("/api/sessions", headers=node.headers("operator"), json=body)
    assert response.status_code == 201, response.text
    return dict(response.json()["session"])


async def control(http: httpx.AsyncClient, node: NodeUnderTest, session_id: str, action: str) -> httpx.Response:
    return await http.post(f"/api/sessions/{session_id}/{action}", headers=node.headers("operator"))


async def running(http: httpx.AsyncClient, node: NodeUnderTest) -> str:
    session_id = str((await create(http, node))["id"])
    assert (await control(http, node, session_id, "start")).status_code == 200
    return session_id


async def post_detections(
    http: httpx.AsyncClient, node: NodeUnderTest, session_id: str, body: Any, role: str = "detector"
) -> httpx.Response:
    return await http.post(f"/api/sessions/{session_id}/detections", headers=node.headers(role), json=body)


# ---- unauthenticated endpoints -----------------------------------------------------------------


async def test_health_is_200_healthy(http: httpx.AsyncClient) -> None:
    response = await http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}


async def test_ready_is_200_with_the_database_ok(http: httpx.AsyncClient) -> None:
    response = await http.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == "ok"


PROMETHEUS_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? \S+$')


async def test_metrics_are_prometheus_text_with_testpulse_series(
    http: httpx.AsyncClient, node: NodeUnderTest, connect: Connect
) -> None:
    client = await connect(node, "admin")
    session_id = (await client.start_session())["id"]
    await client.publish(session_id)
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    samples = [line for line in lines if line and not line.startswith("#")]
    for line in samples:
        assert PROMETHEUS_SAMPLE.match(line), f"not a Prometheus sample line: {line!r}"
    names = {line.split("{")[0].split(" ")[0] for line in samples}
    for expected in (
        "testpulse_connects_total",
        "testpulse_detections_stored_total",
        "testpulse_events_received_total",
    ):
        assert expected in names, f"{expected} missing from /metrics"
    assert any(line.startswith("# TYPE testpulse_") for line in lines)
    stored = next(line for line in samples if line.startswith("testpulse_detections_stored_total"))
    assert float(stored.split()[-1]) >= 1


# ---- authentication and roles ------------------------------------------------------------------

PROTECTED = [
    ("GET", "/api/sessions"),
    ("GET", "/api/sessions/some-id"),
    ("GET", "/api/sessions/some-id/events"),
    ("POST", "/api/sessions"),
    ("POST", "/api/sessions/some-id/start"),
    ("POST", "/api/sessions/some-id/detections"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_missing_token_is_401_auth_missing(http: httpx.AsyncClient, method: str, path: str) -> None:
    error_of(await http.request(method, path), 401, "auth_missing")


@pytest.mark.parametrize(
    "header", ["Bearer garbage", "Bearer x", "Basic dXNlcjpwYXNz", "garbage"], ids=["garbage", "short", "basic", "raw"]
)
async def test_bad_authorization_header_is_401(http: httpx.AsyncClient, header: str) -> None:
    response = await http.get("/api/sessions", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["error"]["code"] in ("auth_missing", "auth_invalid")


async def test_expired_token_is_401_auth_expired(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    response = await http.get("/api/sessions", headers=node.headers("viewer", ttl=-10))
    error_of(response, 401, "auth_expired")


@pytest.mark.parametrize("role", ["viewer", "detector"])
async def test_roles_without_control_get_403_unauthorized(
    http: httpx.AsyncClient, node: NodeUnderTest, role: str
) -> None:
    session_id = (await create(http, node))["id"]
    error_of(await http.post("/api/sessions", headers=node.headers(role)), 403, "unauthorized")
    for action in ("start", "pause", "resume", "stop"):
        response = await http.post(f"/api/sessions/{session_id}/{action}", headers=node.headers(role))
        error_of(response, 403, "unauthorized")


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_roles_without_publish_get_403_unauthorized(
    http: httpx.AsyncClient, node: NodeUnderTest, role: str
) -> None:
    session_id = await running(http, node)
    error_of(await post_detections(http, node, session_id, detection(), role=role), 403, "unauthorized")


async def test_token_limited_to_other_sessions_gets_403_forbidden(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    session_id = await running(http, node)
    limited = node.headers("admin", sessions=["another"])
    error_of(await http.get(f"/api/sessions/{session_id}", headers=limited), 403, "forbidden")
    error_of(await http.get(f"/api/sessions/{session_id}/events", headers=limited), 403, "forbidden")
    error_of(await http.post(f"/api/sessions/{session_id}/pause", headers=limited), 403, "forbidden")
    response = await http.post(f"/api/sessions/{session_id}/detections", headers=limited, json=detection())
    error_of(response, 403, "forbidden")
    error_of(await http.post("/api/sessions", headers=limited), 403, "forbidden")


# ---- sessions ----------------------------------------------------------------------------------


async def test_create_session_is_201_with_a_created_session(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    response = await http.post(
        "/api/sessions", headers=node.headers("operator"), json={"name": "http run", "config": {"k": [1, 2]}}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["ok"] is True
    session = body["session"]
    assert set(session) == {"id", "name", "status", "created_at", "updated_at", "last_seq", "config"}
    assert (session["name"], session["status"], session["last_seq"], session["config"]) == (
        "http run",
        "created",
        0,
        {"k": [1, 2]},
    )


async def test_create_session_without_a_body_is_201(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    response = await http.post("/api/sessions", headers=node.headers("admin"))
    assert response.status_code == 201
    assert response.json()["session"]["status"] == "created"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "n" * 201}, "name"),
        ({"config": "x"}, "config"),
        ({"session_id": "mine"}, "session_id"),
        ([1, 2], "payload"),
    ],
)
async def test_create_session_with_bad_fields_is_400_naming_the_field(
    http: httpx.AsyncClient, node: NodeUnderTest, body: Any, field: str
) -> None:
    response = await http.post("/api/sessions", headers=node.headers("operator"), json=body)
    assert error_of(response, 400, "bad_request").startswith(f"{field}:")


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"name": "x"', b"\xff\xfe", b"[1,"], ids=["brace", "open", "bytes", "list"]
)
async def test_malformed_json_body_is_400(http: httpx.AsyncClient, node: NodeUnderTest, body: bytes) -> None:
    headers = {**node.headers("operator"), "Content-Type": "application/json"}
    error_of(await http.post("/api/sessions", headers=headers, content=body), 400, "bad_request")
    session_id = await running(http, node)
    response = await http.post(f"/api/sessions/{session_id}/detections", headers=headers, content=body)
    error_of(response, 403, "unauthorized")  # role is judged before the body
    admin = {**node.headers("admin"), "Content-Type": "application/json"}
    response = await http.post(f"/api/sessions/{session_id}/detections", headers=admin, content=body)
    assert error_of(response, 400, "bad_request").startswith("body:")


async def test_body_above_the_payload_limit_is_413(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    limit = node.settings.max_payload_bytes
    session_id = await running(http, node)
    big = b'{"label": "x", "confidence": 0.5, "attributes": {"pad": "' + b"x" * limit + b'"}}'
    headers = {**node.headers("detector"), "Content-Type": "application/json"}
    response = await http.post(f"/api/sessions/{session_id}/detections", headers=headers, content=big)
    error_of(response, 413, "payload_too_large")

    async def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    response = await http.post(f"/api/sessions/{session_id}/detections", headers=headers, content=chunks())
    error_of(response, 413, "payload_too_large")
    events = await http.get(f"/api/sessions/{session_id}/events", headers=node.headers("viewer"))
    assert events.json()["events"] == []


async def test_list_sessions_includes_new_ones_and_honours_the_sessions_claim(
    http: httpx.AsyncClient, node: NodeUnderTest
) -> None:
    a, b = (await create(http, node, name="a"))["id"], (await create(http, node, name="b"))["id"]
    listed = await http.get("/api/sessions", headers=node.headers("viewer"))
    assert listed.status_code == 200
    ids = [s["id"] for s in listed.json()["sessions"]]
    assert a in ids and b in ids
    limited = await http.get("/api/sessions", headers=node.headers("viewer", sessions=[b, "unknown"]))
    assert [s["id"] for s in limited.json()["sessions"]] == [b]


async def test_list_sessions_limit_is_validated(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    await create(http, node)
    await create(http, node)
    response = await http.get("/api/sessions", params={"limit": 1}, headers=node.headers("viewer"))
    assert len(response.json()["sessions"]) == 1
    response = await http.get("/api/sessions", params={"limit": "many"}, headers=node.headers("viewer"))
    assert error_of(response, 400, "bad_request").startswith("limit:")


async def test_get_session_returns_it(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    created = await create(http, node, name="detail")
    response = await http.get(f"/api/sessions/{created['id']}", headers=node.headers("viewer"))
    assert response.status_code == 200
    assert response.json()["session"] == created


async def test_unknown_session_is_404(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    viewer, operator = node.headers("viewer"), node.headers("operator")
    error_of(await http.get("/api/sessions/nope", headers=viewer), 404, "not_found")
    error_of(await http.get("/api/sessions/nope/events", headers=viewer), 404, "not_found")
    error_of(await http.post("/api/sessions/nope/start", headers=operator), 404, "not_found")
    error_of(await post_detections(http, node, "nope", detection()), 404, "not_found")


async def test_session_id_longer_than_64_characters_is_400(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    response = await http.get(f"/api/sessions/{'x' * 65}", headers=node.headers("viewer"))
    assert error_of(response, 400, "bad_request").startswith("session_id:")


async def test_unknown_action_is_404(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    session_id = (await create(http, node))["id"]
    error_of(await control(http, node, session_id, "explode"), 404, "not_found")


HTTP_ALLOWED = {
    ("start", "created"): "running",
    ("pause", "running"): "paused",
    ("resume", "paused"): "running",
    ("stop", "running"): "stopped",
    ("stop", "paused"): "stopped",
}
PATH_TO = {"created": [], "running": ["start"], "paused": ["start", "pause"], "stopped": ["start", "stop"]}


@pytest.mark.parametrize("source", list(PATH_TO))
@pytest.mark.parametrize("action", ["start", "pause", "resume", "stop"])
async def test_state_machine_over_http_is_200_or_409(
    http: httpx.AsyncClient, node: NodeUnderTest, action: str, source: str
) -> None:
    session_id = (await create(http, node))["id"]
    for step in PATH_TO[source]:
        assert (await control(http, node, session_id, step)).status_code == 200
    response = await control(http, node, session_id, action)
    expected = HTTP_ALLOWED.get((action, source))
    if expected is None:
        error_of(response, 409, "invalid_transition")
        current = await http.get(f"/api/sessions/{session_id}", headers=node.headers("viewer"))
        assert current.json()["session"]["status"] == source
    else:
        assert response.status_code == 200, response.text
        assert response.json()["ok"] is True
        assert response.json()["session"]["status"] == expected


async def test_stop_reason_over_http_is_validated_and_audited(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    session_id = await running(http, node)
    url = f"/api/sessions/{session_id}/stop"
    response = await http.post(url, headers=node.headers("operator"), json={"reason": "r" * 501})
    assert error_of(response, 400, "bad_request").startswith("reason:")
    response = await http.post(url, headers=node.headers("operator"), json={"reason": "budget"})
    assert response.status_code == 200
    assert (await node.audit_rows(session_id))[-1]["reason"] == "budget"


# ---- detections and events ---------------------------------------------------------------------


async def test_post_one_detection_is_201_with_its_seq(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    session_id = await running(http, node)
    response = await post_detections(http, node, session_id, detection(0))
    assert response.status_code == 201
    assert response.json() == {"ok": True, "seq": 1}


async def test_post_a_batch_is_201_with_first_and_last_seq(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    session_id = await running(http, node)
    await post_detections(http, node, session_id, detection(0))
    response = await post_detections(http, node, session_id, {"detections": [detection(i) for i in range(1, 4)]})
    assert response.status_code == 201
    assert response.json() == {"ok": True, "first_seq": 2, "last_seq": 4, "seqs": [2, 3, 4], "duplicates": 0}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"label": "x", "confidence": 9}, "confidence"),
        ({"confidence": 0.5}, "label"),
        ({"detections": []}, "detections"),
        ({"detections": [{"label": "x", "confidence": 0.5}, {"label": "y"}]}, "detections[1].confidence"),
        ("just a string", "payload"),
    ],
)
async def test_bad_detection_over_http_is_400_naming_the_field(
    http: httpx.AsyncClient, node: NodeUnderTest, body: Any, field: str
) -> None:
    session_id = await running(http, node)
    response = await post_detections(http, node, session_id, body)
    assert error_of(response, 400, "bad_request").startswith(f"{field}:")


@pytest.mark.parametrize("action", [[], ["pause"], ["pause", "stop"]], ids=["created", "paused", "stopped"])
async def test_detection_for_a_session_not_running_is_409(
    http: httpx.AsyncClient, node: NodeUnderTest, action: list[str]
) -> None:
    session_id = (await create(http, node))["id"]
    if action:
        await control(http, node, session_id, "start")
    for step in action:
        await control(http, node, session_id, step)
    error_of(await post_detections(http, node, session_id, detection()), 409, "session_not_running")


async def test_events_page_with_after_seq_and_limit(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    session_id = await running(http, node)
    await post_detections(http, node, session_id, {"detections": [detection(i) for i in range(10)]})
    url, headers = f"/api/sessions/{session_id}/events", node.headers("viewer")
    every = (await http.get(url, headers=headers)).json()["events"]
    assert [e["seq"] for e in every] == list(range(1, 11))
    assert set(every[0]) == {
        "session_id",
        "seq",
        "id",
        "label",
        "confidence",
        "bbox",
        "frame",
        "ts",
        "attributes",
        "received_at",
    }
    page = (await http.get(url, headers=headers, params={"after_seq": 3, "limit": 4})).json()["events"]
    assert [e["seq"] for e in page] == [4, 5, 6, 7]
    assert [e["label"] for e in page] == [f"object-{i}" for i in range(3, 7)]
    assert (await http.get(url, headers=headers, params={"after_seq": 10})).json()["events"] == []
    assert (await http.get(url, headers=headers, params={"after_seq": 999})).json()["events"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"after_seq": "-1"}, "after_seq"),
        ({"after_seq": "abc"}, "after_seq"),
        ({"after_seq": "1.5"}, "after_seq"),
        ({"after_seq": "²"}, "after_seq"),
        ({"after_seq": "9" * 30}, "after_seq"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "²"}, "limit"),
    ],
)
async def test_events_query_parameters_are_validated(
    http: httpx.AsyncClient, node: NodeUnderTest, params: dict[str, str], field: str
) -> None:
    session_id = await running(http, node)
    response = await http.get(f"/api/sessions/{session_id}/events", params=params, headers=node.headers("viewer"))
    assert error_of(response, 400, "bad_request").startswith(f"{field}:")


async def test_detections_published_over_http_reach_socket_viewers(
    http: httpx.AsyncClient, node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    session_id = await running(http, node)
    viewer = await connect(node, "viewer", transport=transport)
    await viewer.join(session_id)
    await post_detections(http, node, session_id, detection(0, ts=1_700_000_000_001))
    await post_detections(http, node, session_id, {"detections": [detection(i) for i in range(1, 4)]})
    assert await viewer.wait_for_seqs(session_id, 4) == [1, 2, 3, 4]
    first = viewer.detections(session_id)[0]
    assert (first["label"], first["ts"], first["attributes"]) == ("object-0", 1_700_000_000_001, {"i": 0})


async def test_state_changes_over_http_reach_socket_room_members(
    http: httpx.AsyncClient, node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    session_id = await running(http, node)
    viewer = await connect(node, "viewer", transport=transport)
    await viewer.join(session_id)
    await control(http, node, session_id, "pause")
    update = await viewer.wait_for_event("test_session_update", lambda u: u["session_id"] == session_id)
    assert (update["previous_status"], update["status"], update["actor"]) == ("running", "paused", "test-operator")


async def test_json_body_nested_too_deeply_to_parse_is_400(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    session_id = await running(http, node)
    body = b"[" * 100_000 + b"]" * 100_000
    headers = {**node.headers("detector"), "Content-Type": "application/json"}
    response = await http.post(f"/api/sessions/{session_id}/detections", headers=headers, content=body)
    assert error_of(response, 400, "bad_request").startswith("body:")


async def test_node_info_names_the_transport_the_node_runs(http: httpx.AsyncClient, node: NodeUnderTest) -> None:
    # `auto` is lean with the libraries this project pins (tests/unit/test_internals.py checks them).
    expected = "stock" if node.settings.transport == "stock" else "lean"
    response = await http.get("/metrics")
    info = next(line for line in response.text.splitlines() if line.startswith("testpulse_node_info{"))
    assert f'transport="{expected}"' in info, info
