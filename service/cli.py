"""`tokenwire serve` and `tokenwire up`: the verbs the server adds to the `tokenwire` command.

Registered under the `tokenwire.commands` entry points (see pyproject.toml); the dispatcher in
`tokenwire.client.command` calls each registration function with its subparsers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (flags override TOKENWIRE_* env vars)")
    p.add_argument("--host", help="bind address (TOKENWIRE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (TOKENWIRE_PORT, default 50051; 0 = any)")
    p.add_argument("--model-dir", type=Path, help="model directory (TOKENWIRE_MODEL_DIR)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], help="TOKENWIRE_PROVIDER")
    p.add_argument("--intra-op-threads", type=int, help="ORT threads, 0 = auto")
    p.add_argument("--max-batch-size", type=int, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, help="requests waiting beyond the batch")
    p.add_argument("--drain-grace-s", type=float, help="seconds in-flight streams get on SIGTERM")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--log-format", choices=["json", "console"])
    p.add_argument("--log-content", action="store_true", default=None, help="log prompts/outputs")
    _add_serve_security(p)
    p.set_defaults(run=_run_serve)


def _add_serve_security(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-keys-file", type=Path, help="bearer keys, one a line (TOKENWIRE_API_KEYS_FILE)"
    )
    p.add_argument(
        "--tls-cert", type=Path, help="server certificate chain, PEM (TOKENWIRE_TLS_CERT)"
    )
    p.add_argument("--tls-key", type=Path, help="server private key, PEM (TOKENWIRE_TLS_KEY)")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        help="require client certs from this CA (TOKENWIRE_TLS_CLIENT_CA)",
    )
    p.add_argument(
        "--metrics-tls", action="store_true", default=None, help="serve /metrics over TLS too"
    )


def _run_serve(args: argparse.Namespace) -> int:
    from tokenwire.server.config import Settings, SettingsError
    from tokenwire.server.main import serve

    overrides = {
        k: v for k, v in vars(args).items() if k not in {"command", "run"} and v is not None
    }
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"tokenwire serve: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def add_up_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="run the server and the edge together (what `make run` does)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=9464)
    p.add_argument("--drain-grace-s", type=float, help="drain grace of the edge, then the server")
    p.set_defaults(run=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from tokenwire.server.up import run_up

    return run_up(args.host, args.grpc_port, args.http_port, args.metrics_port, args.drain_grace_s)
