"""The `tokenwire` command. Its verbs live with the code they start and are found at run time.

Each installed distribution declares its verbs as `tokenwire.commands` entry points, each a
function that adds one subparser (and its `run` default) to the command line. tokenwire-client
alone offers `generate`, `tokenize` and `edge`; the full tokenwire install adds `serve` and `up`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "tokenwire.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire", description="Typed, cancellable LLM token streams over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Sorted by name so `tokenwire --help` lists the verbs in the same order on every install.
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
