"""`tokenwire serve` and `tokenwire up`: the verbs the server adds to the `tokenwire` command.

Registered under the `tokenwire.commands` entry points (see pyproject.toml); the dispatcher in
`tokenwire.client.command` calls each registration function with its subparsers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tokenwire.common.settings import SettingsError, add_flags, read_settings

_LAYERED = "Each flag overrides its TOKENWIRE_* variable, which overrides the default."


def _add_verb(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    settings_cls: type[Any],
    run: Callable[[Any], int],
) -> None:
    """One verb: its flags come from its settings class; running it reads them, then runs."""
    parser = sub.add_parser(name, help=help_text, description=_LAYERED)
    add_flags(parser, settings_cls)

    def _run(args: argparse.Namespace) -> int:
        try:
            settings = read_settings(settings_cls, args)
        except SettingsError as exc:
            print(f"tokenwire {name}: {exc}", file=sys.stderr)
            return 2
        return run(settings)

    parser.set_defaults(run=_run)


def _serve(settings: Any) -> int:
    from tokenwire.server.main import serve  # the engine's imports, only when serving

    return serve(settings)


def add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tokenwire.server.config import Settings

    _add_verb(sub, "serve", "run the gRPC server", Settings, _serve)


def add_up_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tokenwire.server.up import UpSettings, run_up

    _add_verb(
        sub, "up", "run the server and the edge together (what `make run` does)", UpSettings, run_up
    )
