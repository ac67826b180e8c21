"""The README's examples run as written, against a live server and edge on free ports.

Each block the README marks with `<!-- tests/test_readme.py runs this block -->` is run as is
(shell blocks with bash from the repository root, Python blocks with this interpreter), with
TOKENWIRE_TARGET and TOKENWIRE_EDGE_URL pointing at the live processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import EdgeProcess, ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- tests/test_readme.py runs this block -->"
BLOCK = re.compile(re.escape(MARK) + r"\n```(sh|python)\n(.*?)```", re.S)
BLOCKS = BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live() -> Iterator[dict[str, str]]:
    """A server and an edge on free ports; the environment the examples read."""
    server = ServerProcess("--metrics-port", "0")
    server.wait_for("server.started")
    edge = EdgeProcess(server.target)
    yield {**os.environ, "TOKENWIRE_TARGET": server.target, "TOKENWIRE_EDGE_URL": edge.url}
    edge.close()
    server.close()


# How each example (in README order) shows that its stream ended: the CLI's --stats and the
# Python client print the finish reason, curl shows the `done` event, the OpenAI example the
# usage chunk. (The text itself may be all whitespace: the bundled model writes Python.)
ENDS = ["finish: ", "event: done", " tokens]", "finish: "]


def test_the_readme_marks_its_runnable_examples() -> None:
    """The CLI, curl, OpenAI SDK and Python client examples are all marked to run."""
    assert [kind for kind, _ in BLOCKS] == ["sh", "sh", "python", "python"]


@pytest.mark.parametrize(
    ("kind", "code", "end"),
    [(kind, code, end) for (kind, code), end in zip(BLOCKS, ENDS, strict=True)],
    ids=["cli", "curl", "openai", "python-client"],
)
def test_a_readme_example_runs_as_written(
    live: dict[str, str], kind: str, code: str, end: str
) -> None:
    """The example exits 0 and shows how its stream ended."""
    command = (
        ["bash", "-euo", "pipefail", "-c", code] if kind == "sh" else [sys.executable, "-c", code]
    )
    done = subprocess.run(
        command, cwd=ROOT, env=live, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert end in done.stdout + done.stderr


def test_the_readme_shows_the_curl_examples_real_output(live: dict[str, str]) -> None:
    """The output the README shows under the curl example (its first token event and its
    usage counts) is what that example prints against the bundled model."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = BLOCKS[1][1]
    shown = readme[readme.index(code) + len(code) :]
    first_token = re.search(r"^data: (\{\"text\".*\})$", shown, re.M)
    usage = re.search(
        r"^data: (\{\"prompt_tokens\":\d+,\"completion_tokens\":\d+,\"total_tokens\":\d+)",
        shown,
        re.M,
    )
    assert first_token is not None
    assert usage is not None
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=ROOT,
        env=live,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = [line.removeprefix("data: ") for line in done.stdout.splitlines()]
    assert first_token.group(1) in printed
    assert any(line.startswith(usage.group(1) + ",") for line in printed)
