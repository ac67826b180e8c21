"""`tokenwire serve` and `tokenwire up`: the verbs the server adds to the `tokenwire` command.

Registered under the `tokenwire.commands` entry points (see pyproject.toml); the dispatcher in
`tokenwire.client.command` calls each registration function with its subparsers.
"""

from __future__ import annotations

import argparse
import sys

from tokenwire.common.settings import SettingsError, add_flags, read_settings


def add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tokenwire.server.config import Settings

    p = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Each flag overrides its TOKENWIRE_* variable, which overrides the default.",
    )
    add_flags(p, Settings)
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from tokenwire.server.config import Settings
    from tokenwire.server.main import serve

    try:
        settings = read_settings(Settings, args)
    except SettingsError as exc:
        print(f"tokenwire serve: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def add_up_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tokenwire.server.up import UpSettings

    p = sub.add_parser(
        "up",
        help="run the server and the edge together (what `make run` does)",
        description="Each flag overrides its TOKENWIRE_* variable, which overrides the default.",
    )
    add_flags(p, UpSettings)
    p.set_defaults(run=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from tokenwire.server.up import UpSettings, run_up

    try:
        settings = read_settings(UpSettings, args)
    except SettingsError as exc:
        print(f"tokenwire up: {exc}", file=sys.stderr)
        return 2
    return run_up(settings)
