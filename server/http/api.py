"""Starlette routes over the same hub calls as the Socket.IO handlers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from testpulse import metrics
from testpulse.domain.auth import Action, AuthError, Principal, TokenVerifier
from testpulse.domain.presence import Presence
from testpulse.domain.protocol import (
    HTTP_STATUS,
    DetectionIn,
    ErrorCode,
    ProtocolError,
    PublishRequest,
    StartRequest,
    StopRequest,
    bad,
    check_session_id,
    parse_after_seq,
    parse_detection_list,
    parse_limit,
)
from testpulse.domain.sessions import Hub, Verb, batch_ack, publish_ack
from testpulse.http.page import Page

log = logging.getLogger("testpulse.http.api")

Endpoint = Callable[[Request, Principal], Awaitable[Response]]
ReadinessCheck = Callable[[], Awaitable[dict[str, str]]]


def error_response(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class HttpApi:
    def __init__(
        self,
        hub: Hub,
        verifier: TokenVerifier,
        *,
        max_body: int,
        readiness: ReadinessCheck,
        presence: Presence | None = None,
    ) -> None:
        self.hub = hub
        self.presence = presence
        self.verifier = verifier
        self.max_body = max_body
        self.readiness = readiness
        self.page = Page()

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            # The TestExecution page: one shell for both views (it routes by path), and its assets.
            Route("/", self.page.html, methods=["GET"]),
            Route("/sessions/{session_id}", self.page.html, methods=["GET"]),
            Route("/assets/{name}", self.page.asset, methods=["GET"]),
            Route("/api/sessions", self._authed("list_sessions", self.list_sessions), methods=["GET"]),
            Route("/api/sessions", self._authed("create_session", self.create_session), methods=["POST"]),
            Route("/api/sessions/{session_id}", self._authed("get_session", self.get_session), methods=["GET"]),
            Route("/api/sessions/{session_id}/events", self._authed("list_events", self.list_events), methods=["GET"]),
            Route(
                "/api/sessions/{session_id}/presence",
                self._authed("get_presence", self.get_presence),
                methods=["GET"],
            ),
            Route(
                "/api/sessions/{session_id}/detections",
                self._authed("post_detections", self.post_detections),
                methods=["POST"],
            ),
            Route(
                "/api/sessions/{session_id}/{action}",
                self._authed("control_session", self.control_session),
                methods=["POST"],
            ),
        ]

    # ---- unauthenticated ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "healthy"})

    async def ready(self, request: Request) -> Response:
        checks = await self.readiness()
        healthy = all(state == "ok" for state in checks.values())
        return JSONResponse(
            {"status": "ready" if healthy else "not_ready", "checks": checks}, status_code=200 if healthy else 503
        )

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # ---- plumbing ----------------------------------------------------------------------------

    def _authed(self, name: str, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        latency = metrics.HANDLER_SECONDS.labels(f"http_{name}")

        async def route(request: Request) -> Response:
            started = time.perf_counter()
            try:
                header = request.headers.get("authorization", "")
                token = header[7:].strip() if header[:7].lower() == "bearer " else None
                try:
                    principal = await self.verifier.verify(token)
                except AuthError as exc:
                    return error_response(exc.code, exc.message, 503 if exc.code == "unavailable" else 401)
                response = await endpoint(request, principal)
                metrics.EVENTS_RECEIVED.labels(f"http_{name}", "ok").inc()
                return response
            except ProtocolError as exc:
                metrics.EVENTS_RECEIVED.labels(f"http_{name}", exc.code.value).inc()
                return error_response(exc.code.value, exc.message, HTTP_STATUS[exc.code])
            except Exception:
                log.exception("HTTP %s failed", name)
                metrics.EVENTS_RECEIVED.labels(f"http_{name}", "internal").inc()
                return error_response("internal", "internal error", 500)
            finally:
                latency.observe(time.perf_counter() - started)

        return route

    async def _json(self, request: Request, *, optional: bool = False) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, f"body is larger than {self.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, f"body is larger than {self.max_body} bytes")
        if not body.strip():
            if optional:
                return {}
            raise bad("body", "a JSON body is required")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise bad("body", "is not valid JSON") from None
        except RecursionError:  # valid JSON, but nested deeper than the parser goes
            raise bad("body", "is nested too deeply") from None

    # ---- endpoints ---------------------------------------------------------------------------

    async def list_sessions(self, request: Request, who: Principal) -> Response:
        limit = parse_limit(request.query_params.get("limit"), default=1000, maximum=1000)
        sessions = await self.hub.list_sessions(who, limit)
        return JSONResponse({"sessions": [s.view() for s in sessions]})

    async def get_session(self, request: Request, who: Principal) -> Response:
        session = await self.hub.get(who, check_session_id(request.path_params["session_id"]))
        return JSONResponse({"session": session.view()})

    async def list_events(self, request: Request, who: Principal) -> Response:
        session_id = check_session_id(request.path_params["session_id"])
        after = parse_after_seq(request.query_params.get("after_seq"))
        limit = parse_limit(request.query_params.get("limit"))
        rows = await self.hub.events(who, session_id, after, limit)
        return JSONResponse({"events": [r.event() for r in rows]})

    async def get_presence(self, request: Request, who: Principal) -> Response:
        """PROTOCOL.md 1.1: who may ask is whoever may join the session."""
        session_id = check_session_id(request.path_params["session_id"])
        who.require(Action.WATCH, session_id)
        await self.hub.get(who, session_id)
        if self.presence is None:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "presence is not served here")
        return JSONResponse({"presence": await self.presence.answer(session_id)})

    async def create_session(self, request: Request, who: Principal) -> Response:
        req = StartRequest.parse(await self._json(request, optional=True))
        if req.session_id is not None:
            raise bad("session_id", "is chosen by the server; leave it out")
        session = await self.hub.create(who, req.name, req.config)
        return JSONResponse({"ok": True, "session": session.view()}, status_code=201)

    async def control_session(self, request: Request, who: Principal) -> Response:
        session_id = check_session_id(request.path_params["session_id"])
        action = request.path_params["action"]
        if action not in Verb.__members__.values():
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no action '{action[:32]}': use start, pause, resume or stop")
        who.require(Action.CONTROL, session_id)
        reason = None
        if action == "stop":
            body = await self._json(request, optional=True)
            reason = StopRequest.parse({**(body if isinstance(body, dict) else {}), "session_id": session_id}).reason
        session = await self.hub.transition(who, session_id, Verb(action), reason)
        return JSONResponse({"ok": True, "session": session.view()})

    async def post_detections(self, request: Request, who: Principal) -> Response:
        session_id = check_session_id(request.path_params["session_id"])
        who.require(Action.PUBLISH, session_id)
        body = await self._json(request)
        if isinstance(body, dict) and "detections" in body:
            stored = await self.hub.publish(who, PublishRequest(session_id, parse_detection_list(body["detections"])))
            answer = batch_ack(stored)
        else:
            stored = await self.hub.publish(who, PublishRequest(session_id, [DetectionIn.parse(body)]))
            answer = publish_ack(stored)
        # 201 when something was stored; a repeat of stored detections only created nothing.
        created = not all(item.duplicate for item in stored)
        return JSONResponse({"ok": True, **answer}, status_code=201 if created else 200)
