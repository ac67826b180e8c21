"""`tokenwire generate`: stream a completion to the terminal, optionally with timing stats;
`tokenwire tokenize`: print the token ids a server gives a text."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TextIO

from tokenwire.client.client import DEFAULT_TARGET, TokenwireClient
from tokenwire.client.errors import TokenwireError, Unauthenticated
from tokenwire.client.messages import Completion, GenerateOptions, StreamEvent, Token, Usage
from tokenwire.client.security import ChannelSecurity, SecurityError
from tokenwire.client.targets import TARGET_RULE, names_a_target
from tokenwire.common.settings import (
    MAX_SECONDS,
    SettingsError,
    add_flags,
    read_settings,
    require,
    setting,
)
from tokenwire.common.stats import percentile


def add_generate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `generate` verb of the `tokenwire` command (a `tokenwire.commands` entry point)."""
    p = sub.add_parser("generate", help="stream a completion from a running server")
    add_generate_arguments(p)
    p.set_defaults(run=run_generate)


def add_tokenize_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `tokenize` verb of the `tokenwire` command (a `tokenwire.commands` entry point)."""
    p = sub.add_parser("tokenize", help="print the token ids a running server gives a text")
    p.add_argument("text", help="text to tokenize, as a prompt")
    p.add_argument(
        "--pieces", action="store_true", help="print each id with its token's text, one a line"
    )
    p.add_argument(
        "--no-special-tokens",
        dest="add_special_tokens",
        action="store_false",
        help="add no special tokens (BOS), as for a prompt rendered from a chat template",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default 120)")
    add_flags(p, ConnectionSettings)
    p.set_defaults(run=run_tokenize)


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Where `tokenwire generate` connects and how (flags, then TOKENWIRE_* variables)."""

    target: str = setting(
        DEFAULT_TARGET,
        "server address(es): host:port, a comma-separated list to fail over across, or "
        "dns:///name:port",
    )
    api_key: str = setting("", "bearer key sent on every call", secret=True, flag=True)
    tls: bool = setting(False, "use TLS with the system's trust roots")
    tls_ca: Path | None = setting(None, "CA certificate(s) to trust, PEM; implies TLS")
    tls_cert: Path | None = setting(
        None, "client certificate for mTLS, PEM", env="TOKENWIRE_TLS_CLIENT_CERT"
    )
    tls_key: Path | None = setting(
        None, "client private key for mTLS, PEM", env="TOKENWIRE_TLS_CLIENT_KEY"
    )

    def __post_init__(self) -> None:
        require(names_a_target(self.target), "target", TARGET_RULE, self.target)

    def security(self) -> ChannelSecurity:
        return ChannelSecurity(
            api_key=self.api_key,
            tls=self.tls,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
        )


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="most tokens to generate (default 0: the server's default_max_tokens)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature, 0 to 2; 0 = greedy (default 1.0)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample from the k most likely tokens only (default 0: off)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="sample from the most likely tokens until their probability reaches p, in (0, 1] "
        "(default 1.0: off)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="penalise tokens already in the prompt or the output, in (0, 2] (default 1.0: off)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the sampling's random draws, for a reproducible stream (default: the "
        "server picks one)",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        help="end the stream before this text (repeatable; default none)",
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-sequence token, up to --max-tokens",
    )
    parser.add_argument(
        "--request-id",
        default="",
        help="the request's id, in the server's logs and for a Cancel; 1 to 128 printable "
        "ASCII characters (default: the server gives one)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="deadline in seconds of the whole stream, failovers included (default 120)",
    )
    parser.add_argument(
        "--stats", action="store_true", help="print TTFT, inter-token latency and tokens/s"
    )
    parser.add_argument(
        "--json", action="store_true", help="print every event as one JSON object per line"
    )
    parser.add_argument(
        "--no-failover",
        dest="failover",
        action="store_false",
        help="end with the error instead of continuing a broken stream on another target",
    )
    add_flags(parser, ConnectionSettings)


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    return GenerateOptions(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        request_id=args.request_id,
    )


class StreamStats:
    """Client-side view of a stream: when each token arrived."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.arrivals: list[float] = []

    def token(self) -> None:
        self.arrivals.append(time.perf_counter())

    def render(self, completion: Completion | None, usage: Usage | None) -> str:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        ttft = (self.arrivals[0] - self.started) * 1000 if self.arrivals else float("nan")
        span = self.arrivals[-1] - self.arrivals[0] if len(self.arrivals) > 1 else 0.0
        rate = (len(self.arrivals) - 1) / span if span > 0 else float("nan")
        lines = [
            f"tokens: {len(self.arrivals)}",
            f"ttft: {ttft:.1f} ms",
            f"itl p50: {_ms(percentile(gaps, 50)):.2f} ms  p95: {_ms(percentile(gaps, 95)):.2f} ms",
            f"tokens/s: {rate:.1f}",
            f"finish: {completion.finish_reason if completion else 'none'}",
        ]
        if usage is not None:
            lines.append(
                f"server: prompt {usage.prompt_tokens} tokens, queue {usage.queue_time_ms:.1f} ms, "
                f"ttft {usage.time_to_first_token_ms:.1f} ms, request id {usage.request_id}"
            )
        return "\n".join(lines)


def event_json(event: Token | Usage | Completion) -> dict[str, object]:
    """{"token": {...}}, {"usage": {...}} or {"completion": {...}}: one line per event."""
    kind = {Token: "token", Usage: "usage", Completion: "completion"}[type(event)]
    return {kind: dataclasses.asdict(event)}


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1000


BROKEN_PIPE = 128 + 13
"""The exit status when stdout closes early (`| head`): a shell's for a command that SIGPIPE
ended, as `yes | head` gives, without the traceback Python would print."""


def run_generate(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Stream to `out` (default: the standard output at the time of the call), report on
    `err`; 0 for a finished stream, 1 for one that failed or was cut short, 2 for bad settings,
    130 for Ctrl-C, 141 when the reader of the output left."""
    # A write that fails unwinds through the stream, which cancels its call.
    return _run(args, out, err, "the completion", _stream)


def run_tokenize(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Print the text's ids on one line (with --pieces, each id and its token's text as a JSON
    string, tab-separated, one a line) on `out`; 0, 1 for a call that failed (an `error:` line
    on `err`), 2 for bad settings, 130 for Ctrl-C, 141 when the reader of the output left (as
    `generate` answers)."""
    return _run(args, out, err, "the ids", _tokenize)


Work = Callable[[argparse.Namespace, str, ChannelSecurity, TextIO, TextIO], int]
"""A command's work: its arguments, target, security, output and error streams -> status."""


def _run(
    args: argparse.Namespace, out: TextIO | None, err: TextIO | None, what: str, work: Work
) -> int:
    """`work` with the command's connection settings and output (the standard output at the
    time of the call, unless given); 2 for bad settings, 1 without an output to write `what`
    to, else work's status or its output's failure (see _written)."""
    err = _errors(err)
    connected = _connection(args, err)
    if connected is None:
        return 2
    target, security = connected
    out = sys.stdout if out is None else out
    if out is None:  # started with stdout closed (`>&-`)
        err.write(f"error: no standard output to write {what} to\n")
        return 1
    return _written(lambda: work(args, target, security, out, err), out, err)


def _written(write: Callable[[], int], out: TextIO, err: TextIO) -> int:
    """write()'s status, or the status of an output that could not be written: 141 where its
    reader left (`| head`), as a shell gives a command SIGPIPE ended, without the traceback
    Python would print; 1 for another failure (a full disk)."""
    try:
        return write()
    except BrokenPipeError:
        _discard(out)
        return BROKEN_PIPE
    except OSError as exc:
        _discard(out)
        err.write(f"error: cannot write the output: {exc}\n")
        return 1


def _tokenize(
    args: argparse.Namespace, target: str, security: ChannelSecurity, out: TextIO, err: TextIO
) -> int:
    try:
        with TokenwireClient(target, timeout_s=args.timeout, security=security) as client:
            tokens = client.tokenize(
                args.text, add_special_tokens=args.add_special_tokens, with_pieces=args.pieces
            )
    except KeyboardInterrupt:
        err.write("\n[cancelled]\n")
        return 130
    except TokenwireError as exc:
        _say(err, f"error: {_reason(exc, security)}\n")
        return 1
    if args.pieces:
        for i, piece in zip(tokens.ids, tokens.pieces, strict=True):
            # JSON's \u escapes where the output cannot hold the text: the same string, read.
            text = json.dumps(piece, ensure_ascii=False)
            out.write(f"{i}\t{text if _holds(out, text) else json.dumps(piece)}\n")
    else:
        out.write(" ".join(map(str, tokens.ids)) + "\n")
    out.flush()
    return 0


def _errors(err: TextIO | None) -> TextIO:
    """Where to report: `err`, else the standard error at the time of the call, or nowhere
    (sys.stderr is None where the process was started with it closed: say nothing then)."""
    err = sys.stderr if err is None else err
    return io.StringIO() if err is None else err


def _connection(args: argparse.Namespace, err: TextIO) -> tuple[str, ChannelSecurity] | None:
    """The target and channel security the flags and variables give, or None (reported on
    `err`) where a setting or --timeout is refused."""
    try:
        connection = read_settings(ConnectionSettings, args)
        security = connection.security()
        _check_timeout(args.timeout)
    except (SettingsError, SecurityError) as exc:
        err.write(f"error: {exc}\n")
        return None
    return connection.target, security


def _check_timeout(seconds: float) -> None:
    # 0 or less, or beyond what a gRPC deadline holds, would fail every call as
    # DEADLINE_EXCEEDED only once it was made.
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise SettingsError(
            "--timeout",
            f"must be a number of seconds above 0 and at most {MAX_SECONDS}, got {seconds!r}",
        )


def _stream(
    args: argparse.Namespace,
    target: str,
    security: ChannelSecurity,
    out: TextIO,
    err: TextIO,
) -> int:
    stats = StreamStats()
    completion: Completion | None = None
    usage: Usage | None = None
    # Text written on a line not yet ended: an error then starts a line of its own.
    line_open = False
    with TokenwireClient(target, timeout_s=args.timeout, security=security) as client:
        events: Generator[StreamEvent, None, None] | None = None
        try:
            events = client.generate(args.prompt, options_from_args(args), failover=args.failover)
            for event in events:
                _show(event, args.json, out, stats)
                if isinstance(event, Usage):
                    usage = event
                elif isinstance(event, Completion):
                    completion = event
                elif event.text and not args.json:
                    line_open = not event.text.endswith("\n")
        except KeyboardInterrupt:
            err.write("\n[cancelled]\n")
            return 130
        except TokenwireError as exc:
            start = "\n" if line_open else ""
            _say(err, f"{start}error: {_reason(exc, security)}\n")
            return 1
        finally:
            if events is not None:
                events.close()  # cancels the call when the loop ended early
    if not args.json:
        out.write("\n")
        out.flush()
    if args.stats:
        err.write(stats.render(completion, usage) + "\n")
    if completion is not None and completion.finish_reason == "cancelled":
        # A Cancel from elsewhere, or the server's drain running out: the output is partial.
        err.write("error: the stream was cancelled before it finished\n")
        return 1
    return 0


def _show(event: StreamEvent, json_lines: bool, out: TextIO, stats: StreamStats) -> None:
    """Write one event: a token's text, or with json_lines every event as a JSON line."""
    if isinstance(event, Token):
        stats.token()
    if json_lines:
        out.write(json.dumps(event_json(event)) + "\n")
    elif isinstance(event, Token):
        _say(out, event.text)
    else:
        return
    out.flush()


def _reason(exc: TokenwireError, security: ChannelSecurity) -> str:
    """What an `error:` line says of a failed call: the error, or for a key the server
    refused, which flag or variable gives it."""
    if not isinstance(exc, Unauthenticated) or exc.from_channel:
        return str(exc)
    where = "--api-key or TOKENWIRE_API_KEY"
    if security.api_key:
        return f"{exc.code.name}: the server refused the API key ({where})"
    return f"{exc.code.name}: the server requires an API key: give it with {where}"


def _holds(stream: TextIO, text: str) -> bool:
    """Whether `stream` can write `text` as it is: its encoding holds every character (an
    ASCII or cp1252 console does not hold all), or its error handler writes them anyway."""
    encoding = getattr(stream, "encoding", None)
    if not encoding or getattr(stream, "errors", "strict") != "strict":
        return True
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    except LookupError:  # an encoding Python does not know: let the write say
        return True
    return True


def _say(stream: TextIO, text: str) -> None:
    """Write `text`, each character `stream` cannot encode as its backslash escape (\\xe9,
    \\u4e2d, \\U0001f389), as Python writes its own errors: all of the text reaches the
    reader, instead of a write that fails in its middle."""
    if not _holds(stream, text):
        encoding = stream.encoding
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    stream.write(text)


def _discard(out: TextIO) -> None:
    """Point an unwritable stdout (closed by its reader, on a full disk) at /dev/null, so the
    flush at exit does not fail again."""
    try:
        fd = out.fileno()
    except (OSError, ValueError):  # not a file (a test's StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
