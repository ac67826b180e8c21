"""`tokenwire generate` streams visible text and reports stats, against a real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from tests.conftest import RunningServer


async def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokenwire_cli.main", "generate", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


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
