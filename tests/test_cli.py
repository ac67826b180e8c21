"""`tokenwire generate` streams visible text and reports stats, against a real server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from tests.conftest import RunningServer, eventually, start_server
from tests.fakes import ScriptedModel
from tokenwire.client.command import build_parser
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

UNENCODABLE = "# 中文 café 🎉"
"""Text an ASCII console cannot show, from the BMP and beyond it."""


async def _run_cli(
    *args: str, verb: str = "generate", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokenwire.client.command", verb, *args]
    return await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
async def unencodable(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """A server whose scripted model continues the prompt "x" with UNENCODABLE, then EOS."""
    script = tokenizer.encode(UNENCODABLE)
    running = await start_server(
        ScriptedModel.continuing(spec, len(tokenizer.encode("x")), script), tokenizer
    )
    yield running
    await running.server.drain()


async def test_generate_escapes_the_text_an_ascii_output_cannot_encode(
    unencodable: RunningServer,
) -> None:
    """On an output whose encoding cannot hold some of the text (PYTHONIOENCODING=ascii, as a
    cp1252 console cannot hold CJK), `generate` writes those characters as backslash escapes
    and exits 0, with no traceback."""
    done = await _run_cli("x", "--target", unencodable.target, env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "# \\u4e2d\\u6587 caf\\xe9 \\U0001f389\n"
    assert done.stderr == ""


async def test_tokenize_pieces_an_ascii_output_cannot_encode_are_json_escapes(
    served: RunningServer,
) -> None:
    """`tokenize --pieces` on an ASCII output writes each piece it cannot hold as a JSON string
    with \\u escapes: read as JSON, the same pieces as on a UTF-8 output; exit 0."""
    args = (UNENCODABLE, "--pieces", "--target", served.target)
    ascii_out = await _run_cli(*args, verb="tokenize", env={"PYTHONIOENCODING": "ascii"})
    utf8_out = await _run_cli(*args, verb="tokenize", env={"PYTHONIOENCODING": "utf-8"})
    assert ascii_out.returncode == 0, ascii_out.stderr
    assert ascii_out.stderr == ""
    assert ascii_out.stdout.isascii()
    pieces = [line.split("\t") for line in ascii_out.stdout.splitlines()]
    expected = [line.split("\t") for line in utf8_out.stdout.splitlines()]
    assert [(i, json.loads(p)) for i, p in pieces] == [(i, json.loads(p)) for i, p in expected]
    assert any(not p.isascii() for _, p in expected)


def test_every_flag_of_every_verb_says_what_it_does_and_its_default() -> None:
    """`tokenwire VERB --help` has a line of help for every argument, and every flag that takes
    a value names its default."""
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in verbs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {action.option_strings or action.dest}"
            assert action.help, where
            if action.option_strings and action.nargs != 0:
                assert "default" in action.help, where


async def test_generate_prints_tokens_and_stats(served: RunningServer) -> None:
    """The CLI prints the generated text on stdout and TTFT/ITL/tokens/s/finish on stderr."""
    done = await _run_cli(
        "def fib(n):",
        "--target",
        served.target,
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--stats",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    for label in ("ttft:", "itl p50:", "tokens/s:", "finish: length"):
        assert label in done.stderr


async def test_generate_reports_invalid_arguments_clearly(served: RunningServer) -> None:
    """A bad parameter exits non-zero with the server's message naming the field."""
    done = await _run_cli("x", "--target", served.target, "--top-p", "3")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: sampling.top_p" in done.stderr


async def test_an_error_before_any_text_is_one_line(served: RunningServer) -> None:
    """A call refused before any token was written is one `error:` line on stderr, with no
    blank line before it (nothing on stdout to end)."""
    done = await _run_cli("x", "--target", served.target, "--top-p", "3")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("error: INVALID_ARGUMENT: sampling.top_p")
    assert done.stderr.count("\n") == 1


async def test_generate_reports_an_out_of_range_flag_clearly(served: RunningServer) -> None:
    """A negative --max-tokens exits 1 with a message naming the field, not a traceback."""
    done = await _run_cli("x", "--target", served.target, "--max-tokens", "-1")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: max_tokens" in done.stderr
    assert "Traceback" not in done.stderr


async def test_generate_refuses_a_request_id_metadata_cannot_carry(served: RunningServer) -> None:
    """--request-id é exits 1 with INVALID_ARGUMENT naming request_id, not INTERNAL."""
    done = await _run_cli("x", "--target", served.target, "--request-id", "é")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: request_id" in done.stderr


@pytest.mark.usefixtures("interruptible")
async def test_ctrl_c_cancels_the_stream_and_frees_the_server(paced: RunningServer) -> None:
    """SIGINT mid-stream exits 130 with [cancelled] and the server's slot is freed."""
    served = paced
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "generate",
        "def forever():",
        "--target",
        served.target,
        "--max-tokens",
        "450",
        "--ignore-eos",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.read(1), timeout=30)
    assert await eventually(lambda: served.engine.active_count == 1)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert first
    assert proc.returncode == 130
    assert b"[cancelled]" in err
    assert await eventually(lambda: served.engine.active_count == 0)


async def test_a_closed_stdout_ends_the_cli_quietly(paced: RunningServer) -> None:
    """stdout closing mid-stream (`| head -c 20`) ends the CLI with status 141, as SIGPIPE
    would, and no traceback."""
    command = [
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "generate",
        "def fib(n):",
        "--target",
        paced.target,
        "--max-tokens",
        "300",
        "--ignore-eos",
    ]

    def run() -> tuple[int, bytes]:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            assert len(proc.stdout.read(20)) == 20
            proc.stdout.close()
            return proc.wait(30), proc.stderr.read()

    status, err = await asyncio.to_thread(run)
    assert err == b""
    assert status == 141


async def test_tokenize_into_a_closed_pipe_ends_quietly(served: RunningServer) -> None:
    """`tokenwire tokenize ... | head` whose reader has left ends with status 141 and no
    traceback, as `generate` does."""
    command = [
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "tokenize",
        "def fib(n):\n    return n",
        "--pieces",
        "--target",
        served.target,
    ]

    def run() -> tuple[int, bytes]:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            proc.stdout.close()  # the reader leaves before the ids are written
            return proc.wait(30), proc.stderr.read()

    status, err = await asyncio.to_thread(run)
    assert err == b""
    assert status == 141
