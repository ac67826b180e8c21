"""The `tokenwire` command. Its verbs live with the code they start and are found at run time.

Each installed distribution declares its verbs as `tokenwire.commands` entry points, each a
function that adds one subparser (and its `run` default) to the command line. tokenwire-client
alone offers `generate`, `tokenize` and `edge`; the full tokenwire install adds `serve` and `up`.

Loading the verbs imports gRPC, and `serve` then the engine: a signal that comes while the
command starts ends it at once, quietly, with the status it would have had a moment later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

ENTRY_POINT_GROUP = "tokenwire.commands"

SERVICES = frozenset({"serve", "edge", "up"})
"""The verbs that run until SIGINT or SIGTERM stops them, and then exit 0: a signal before
they are ready (their libraries still loading) ends them at once with status 0 as well."""

INTERRUPTED = 128 + signal.SIGINT
"""The status of any other verb that Ctrl-C ends (130, as a shell gives a command SIGINT
ended)."""


def build_parser() -> argparse.ArgumentParser:
    import argparse
    from importlib.metadata import entry_points

    parser = argparse.ArgumentParser(
        prog="tokenwire", description="Typed, cancellable LLM token streams over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Sorted by name so `tokenwire --help` lists the verbs in the same order on every install.
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the verb `argv` (default: the command line) names; its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((arg for arg in argv if not arg.startswith("-")), None)
    service = verb in SERVICES
    status = 0 if service else INTERRUPTED
    # A service puts its own handlers in place once it is ready (serve and edge drain, up
    # stops its children); until then a signal ends it. Another verb reads Ctrl-C as a
    # KeyboardInterrupt once it runs (generate cancels its stream).
    previous = _leave_on(status, (signal.SIGINT, signal.SIGTERM) if service else (signal.SIGINT,))
    try:
        args = build_parser().parse_args(argv)
        if not service:
            _restore(previous)
        result: int = args.run(args)
    except KeyboardInterrupt:
        return status
    finally:
        _restore(previous)
    return result


_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


def _leave_on(status: int, signals: Sequence[signal.Signals]) -> dict[signal.Signals, _Handler]:
    """Make each of `signals` end the process at once with `status`; their handlers before,
    to restore. A signal that is ignored (a background job's SIGINT) stays ignored.

    The process ends there and then rather than by an exception: one raised inside an import
    can be turned into another error (ONNX Runtime's native module reports a failed import)."""

    def leave(signum: int, frame: FrameType | None) -> None:
        for stream in (sys.stdout, sys.stderr):
            # What was written so far (a start-up log line); a write that the signal
            # interrupted cannot be finished.
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(status)

    previous: dict[signal.Signals, _Handler] = {}
    for sig in signals:
        if signal.getsignal(sig) == signal.SIG_IGN:
            continue
        try:
            previous[sig] = signal.signal(sig, leave)
        except ValueError:  # not the main thread (main called from a test): signals stay
            break
    return previous


def _restore(previous: dict[signal.Signals, _Handler]) -> None:
    while previous:
        sig, handler = previous.popitem()
        signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
