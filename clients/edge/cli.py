"""`tokenwire edge`: the HTTP/SSE edge's verb of the `tokenwire` command.

Registered as a `tokenwire.commands` entry point of tokenwire-client. The edge's own libraries
come with the `[edge]` extra, so this module imports them only when the verb runs; without
them the verb still shows up and says how to install them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys

# Top-level modules the edge needs beyond the client (the `[edge]` extra).
EDGE_MODULES = (
    "starlette",
    "uvicorn",
    "sse_starlette",
    "jinja2",
    "prometheus_client",
    "structlog",
    "grpc_health",
)


def add_edge_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("edge", help="run the HTTP/SSE edge (native SSE + OpenAI-compatible API)")
    p.add_argument("--host", help="bind address (TOKENWIRE_EDGE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (TOKENWIRE_EDGE_PORT, default 8000)")
    p.add_argument("--grpc-target", help="server address (TOKENWIRE_GRPC_TARGET)")
    p.add_argument("--resume-window-s", type=float, help="keep generating this long after a drop")
    p.add_argument(
        "--drain-grace-s", type=float, help="seconds in-flight streams get on SIGTERM (default 30)"
    )
    p.add_argument("--log-format", choices=["json", "console"], default=None)
    p.set_defaults(run=_run_edge)


def missing_modules() -> list[str]:
    """The edge's libraries that are not installed (empty with the `[edge]` extra)."""
    return [name for name in EDGE_MODULES if importlib.util.find_spec(name) is None]


def _run_edge(args: argparse.Namespace) -> int:
    missing = missing_modules()
    if missing:
        print(
            f"tokenwire edge: needs {', '.join(missing)}; "
            "install the edge extra: pip install 'tokenwire-client[edge]'",
            file=sys.stderr,
        )
        return 2
    import asyncio
    import os

    from tokenwire.client.security import SecurityError
    from tokenwire.edge.logs import configure_logging
    from tokenwire.edge.server import run_edge
    from tokenwire.edge.settings import EdgeSettings, EdgeSettingsError
    from tokenwire.edge.upstream import upstream_security

    fmt = args.log_format or os.environ.get("TOKENWIRE_LOG_FORMAT", "json")
    overrides = {k: v for k, v in vars(args).items() if k not in {"command", "run", "log_format"}}
    try:
        settings = EdgeSettings.from_env(**overrides)
        upstream_security(settings)
    except (EdgeSettingsError, SecurityError) as exc:
        print(f"tokenwire edge: {exc}", file=sys.stderr)
        return 2
    configure_logging(fmt)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_edge(settings))
    return 0
