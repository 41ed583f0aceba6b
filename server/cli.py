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

from testpulse.devtools import cluster, loadtest
from testpulse.domain.auth import issue_token, parse_ttl
from testpulse.settings import Settings, SettingsError, env_name

# Socket.IO/Engine.IO framing around a payload; the WebSocket frame limit sits just above the
# message limit so that Engine.IO, not the frame parser, decides what is too large.
FRAME_OVERHEAD_BYTES = 4096
# How often `testpulse migrate --check --wait` asks again: a pod starts at most this late after the migration.
CHECK_INTERVAL_SECONDS = 2.0


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        raise SystemExit(f"testpulse: bad configuration: {exc}") from None


class DrainingServer:
    """uvicorn server whose first SIGTERM/SIGINT drains the node before uvicorn shuts down."""

    def __init__(self, app: Any, settings: Settings, host: str, port: int) -> None:
        import uvicorn

        from testpulse.transport import auto

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="auto",
            http="auto",
            ws=auto.uvicorn_ws(app.node.transport),  # decided once, by the node (server/transport/auto.py)
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
    from testpulse.app import create_app

    DrainingServer(create_app(settings), settings, args.host, args.port).run()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings()
    if not settings.hmac_enabled:
        print(
            "testpulse token: TESTPULSE_JWKS_URL is set without TESTPULSE_JWT_SECRET, so nodes accept only"
            " the identity provider's tokens; get one from it",
            file=sys.stderr,
        )
        return 2
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
    """Upgrade the database of TESTPULSE_DATABASE_URL to this build's schema (or print the SQL, or
    only check whether it is this build's)."""
    settings = _settings()
    from testpulse.store import schema

    if args.sql:
        print(schema.offline_sql(settings.database_url), end="")
        return 0
    if args.check:
        return asyncio.run(_check(settings, args.wait))
    try:
        state = asyncio.run(_upgrade(settings.database_url))
    except schema.SchemaError as exc:
        print(f"testpulse migrate: {exc}", file=sys.stderr)
        return 1
    print(f"testpulse migrate: database schema at revision {state.revision} (this build's newest)")
    return 0


async def _check(settings: Settings, wait: float) -> int:
    """`testpulse migrate --check [--wait S]`: exit with the verdict's code (schema_check.Verdict)."""
    from testpulse.store.schema_check import Finding, SchemaCheck, Verdict

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prefix = "testpulse migrate --check:"

    def report(finding: Finding, elapsed: float) -> None:
        print(f"{prefix} waiting for the schema ({elapsed:.0f} s of {wait:.0f}): {finding.message}", flush=True)

    check = SchemaCheck(settings.database_url, timeout=settings.database_timeout_seconds)
    try:
        finding = await check.until_current(within=wait, interval=CHECK_INTERVAL_SECONDS, report=report)
    finally:
        await check.close()
    if finding.verdict is Verdict.CURRENT:
        print(f"{prefix} {finding.message}", flush=True)
    elif wait > 0 and finding.verdict is not Verdict.NEWER:
        print(f"{prefix} gave up after {wait:.0f} s: {finding.message}", file=sys.stderr, flush=True)
    else:
        print(f"{prefix} {finding.message}", file=sys.stderr, flush=True)
    return int(finding.verdict)


async def _upgrade(url: str) -> Any:
    from testpulse.store.auto import open_database

    db = open_database(url)
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
    from testpulse import metrics

    print(metrics.reference(), end="")
    return 0


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {raw!r}")
    return value


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
    mode = migrate.add_mutually_exclusive_group()
    mode.add_argument(
        "--sql", action="store_true", help="print the SQL from an empty database instead (offline, no connection)"
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 0 when the schema is this build's, 1 when a migration is pending (empty or"
        " older), 3 when it is newer than this build, 4 when the database does not answer",
    )
    migrate.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="with --check: check again every few seconds until the schema is this build's, for at most this"
        " long (a newer schema ends the wait at once); for a pod that must not start before `testpulse migrate`",
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
    root = parser()
    args = root.parse_args(argv)
    if args.command == "migrate" and args.wait and not args.check:
        root.error("migrate --wait needs --check")
    return int(args.run(args))
