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
    "opentelemetry",
    "redis",
)


def add_edge_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tokenwire.common.settings import add_flags
    from tokenwire.edge.settings import EdgeSettings

    p = sub.add_parser(
        "edge",
        help="run the HTTP/SSE edge (native SSE + OpenAI-compatible API)",
        description="Each flag overrides its TOKENWIRE_* variable, which overrides the default.",
    )
    add_flags(p, EdgeSettings)
    p.set_defaults(run=_run_edge)


def missing_modules() -> list[str]:
    """The edge's libraries that are not installed (empty with the `[edge]` extra)."""
    return [name for name in EDGE_MODULES if importlib.util.find_spec(name) is None]


def _run_edge(args: argparse.Namespace) -> int:
    missing = missing_modules()
    if missing:
        print(
            f"tokenwire edge: needs {', '.join(missing)}; "
            "install the edge extra: pip install './clients[edge]' (from a checkout)",
            file=sys.stderr,
        )
        return 2
    import asyncio

    from tokenwire.client.security import SecurityError
    from tokenwire.common.logs import configure_logging
    from tokenwire.common.settings import SettingsError, read_settings
    from tokenwire.edge.server import run_edge
    from tokenwire.edge.settings import EdgeSettings
    from tokenwire.edge.upstream import upstream_security

    try:
        settings = read_settings(EdgeSettings, args)
        upstream_security(settings)
    except (SettingsError, SecurityError) as exc:
        print(f"tokenwire edge: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_edge(settings))
    return 0
