"""`testpulse serve | migrate | token | config | cluster`: maps flags onto Settings, nothing else."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from types import FrameType
from typing import Any
from urllib.parse import quote

from server import cluster, loadtest
from server.auth import issue_token, parse_ttl
from server.settings import Settings, SettingsError, env_name

# Socket.IO/Engine.IO framing around a payload; the WebSocket frame limit sits just above the
# message limit so that Engine.IO, not the frame parser, decides what is too large.
FRAME_OVERHEAD_BYTES = 4096


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        raise SystemExit(f"testpulse: bad configuration: {exc}") from None


class DrainingServer:
    """uvicorn server whose first SIGTERM/SIGINT drains the node before uvicorn shuts down."""

    def __init__(self, app: Any, settings: Settings, host: str, port: int) -> None:
        import uvicorn

        from server import engine

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="auto",
            http="auto",
            ws=engine.uvicorn_ws(app.node.transport),  # decided once, by the node (server/engine.py)
            ws_max_size=settings.max_payload_bytes + FRAME_OVERHEAD_BYTES,
            ws_ping_interval=None,  # Engine.IO pings; a second heartbeat only costs frames
            ws_per_message_deflate=settings.websocket_compression,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
            log_level=settings.log_level,
            access_log=False,
            # Longer than nginx keeps an idle upstream connection (60 s), so the proxy never
            # reuses a connection the node has just closed (which would count as a node failure).
            timeout_keep_alive=75,
            lifespan="on",
            proxy_headers=True,
            forwarded_allow_ips=",".join(settings.trusted_proxies),
        )
        self.server = uvicorn.Server(config)
        self.node = app.node
        self._draining: asyncio.Task[None] | None = None
        original = self.server.handle_exit

        def handle_exit(sig: int, frame: FrameType | None) -> None:
            if self._draining is None and not self.server.should_exit:
                self._draining = asyncio.get_event_loop().create_task(self._drain_then_exit())
            else:  # a second signal: stop now
                original(sig, frame)

        self.server.handle_exit = handle_exit  # type: ignore[method-assign]

    async def _drain_then_exit(self) -> None:
        try:
            # drain() keeps to the grace itself; this bound only guards against a step that hangs.
            await asyncio.wait_for(self.node.drain(), self.node.settings.shutdown_timeout_seconds + 2.0)
        except Exception:
            logging.getLogger("testpulse").exception("drain failed")
        self.server.should_exit = True

    def run(self) -> None:
        self.server.run()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(node_id=args.node_id)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import create_app

    DrainingServer(create_app(settings), settings, args.host, args.port).run()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings()
    sessions = [s.strip() for s in args.sessions.split(",") if s.strip()] if args.sessions else None
    try:
        ttl = parse_ttl(args.ttl)
        token = issue_token(settings, role=args.role, sub=args.sub or args.role, ttl_seconds=ttl, sessions=sessions)
        print(page_link(args.url, token, args.session) if args.url else token)
    except ValueError as exc:
        print(f"testpulse token: {exc}", file=sys.stderr)
        return 2
    return 0


def page_link(base_url: str, token: str, session_id: str | None = None) -> str:
    """A link to the TestExecution page with the token in the fragment: browsers never send the
    fragment to a server, so the token stays out of requests, proxies and access logs."""
    path = f"/sessions/{quote(session_id, safe='')}" if session_id else "/"
    return f"{base_url.rstrip('/')}{path}#token={token}"


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database of TESTPULSE_DATABASE_URL to this build's schema (or print the SQL)."""
    settings = _settings()
    from server import schema

    if args.sql:
        print(schema.offline_sql(settings.database_url), end="")
        return 0
    try:
        state = asyncio.run(_upgrade(settings.database_url))
    except schema.SchemaError as exc:
        print(f"testpulse migrate: {exc}", file=sys.stderr)
        return 1
    print(f"testpulse migrate: database schema at revision {state.revision} (this build's newest)")
    return 0


async def _upgrade(url: str) -> Any:
    from server.store import Database

    db = Database(url)
    try:
        return await db.upgrade()
    finally:
        await db.close()


def cmd_config(args: argparse.Namespace) -> int:
    """Print the configuration reference, generated from the Settings object."""
    print("| variable | default | meaning |\n|---|---|---|")
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING:
            default = f.default
            shown = ",".join(default) if isinstance(default, tuple) else ("(unset)" if default is None else default)
        else:
            shown = "(computed)"
        print(f"| `{env_name(f.name)}` | `{shown}` | {f.metadata.get('doc', '')} |")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from server import metrics

    print(metrics.reference(), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="testpulse", description="real-time test-execution hub")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one node under uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--node-id", default=None, help="overrides TESTPULSE_NODE_ID")
    serve.set_defaults(run=cmd_serve)

    token = commands.add_parser("token", help="print a token signed with the configured secret")
    token.add_argument("--role", required=True, choices=["viewer", "operator", "detector", "admin"])
    token.add_argument("--sub", default=None, help="subject (default: the role)")
    token.add_argument("--sessions", default=None, help="comma-separated session ids the token is limited to")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d")
    token.add_argument(
        "--url", default=None, help="print a link to the page at this address instead, the token in its #fragment"
    )
    token.add_argument("--session", default=None, help="with --url: link to this session's live view")
    token.set_defaults(run=cmd_token)

    migrate = commands.add_parser("migrate", help="upgrade the database schema to this build's (run before a roll)")
    migrate.add_argument(
        "--sql", action="store_true", help="print the SQL from an empty database instead (offline, no connection)"
    )
    migrate.set_defaults(run=cmd_migrate)

    config = commands.add_parser("config", help="print the configuration reference")
    config.set_defaults(run=cmd_config)

    reference = commands.add_parser("metrics", help="print the metric reference (docs/metrics.md)")
    reference.set_defaults(run=cmd_metrics)

    cluster.register(commands)
    loadtest.register(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))
