"""The two distributions: tokenwire-client installs alone, without the engine; the full install
puts only `tokenwire.*` names on the import path, and one `tokenwire` command gathers the verbs
of both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compute

ROOT = Path(__file__).resolve().parent.parent
ENGINE_LIBRARIES = ("onnxruntime", "numpy", "tokenizers")
TEST_TOOLS = ("pytest", "mypy", "playwright", "ruff", "hypothesis", "import-linter")
SKIP = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
# The first test to use the client's venv builds it (about 10 s with a warm pip cache).
VENV_TIMEOUT_S = 180


def _run(
    *command: str | Path, cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH could put the checkout on the path and hide what the install provides.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install ./clients` and nothing else, from a copy of the sources
    (an in-tree build would leave build/ and *.egg-info/ in the checkout)."""
    work = tmp_path_factory.mktemp("client-dist")
    shutil.copytree(ROOT / "clients", work / "clients", ignore=SKIP)
    shutil.copytree(ROOT / "protos", work / "protos", ignore=SKIP)
    shutil.copytree(ROOT / "common", work / "common", ignore=SKIP)
    venv = work / "venv"
    made = _run(sys.executable, "-m", "venv", venv, cwd=work)
    assert made.returncode == 0, made.stderr
    installed = _run(
        venv / "bin" / "python", "-m", "pip", "install", "-q", "./clients", cwd=work, timeout=150
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.mark.slow
@pytest.mark.timeout(VENV_TIMEOUT_S)
def test_client_distribution_installs_without_the_engine_libraries(client_venv: Path) -> None:
    """`pip install ./clients` installs tokenwire-client and no onnxruntime*, numpy, tokenizers."""
    listed = _run(
        client_venv / "bin" / "python", "-m", "pip", "list", "--format=json", cwd=client_venv
    )
    names = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert "tokenwire-client" in names
    assert "tokenwire" not in names
    heavy = sorted(n for n in names if n.startswith(ENGINE_LIBRARIES))
    assert heavy == []


@pytest.mark.slow
@pytest.mark.timeout(VENV_TIMEOUT_S)
def test_client_distribution_provides_the_sdk_and_the_stubs(client_venv: Path) -> None:
    """The installed client imports its SDK classes and the generated stubs it carries."""
    code = (
        "from tokenwire.client import AsyncTokenwireClient, TokenwireClient\n"
        "from tokenwire.v1 import generate_pb2\n"
        "import sys\n"
        "assert not {'onnxruntime', 'numpy', 'tokenizers'} & set(sys.modules)\n"
        "print(generate_pb2.GenerateRequest(prompt='x').prompt)"
    )
    imported = _run(client_venv / "bin" / "python", "-c", code, cwd=client_venv)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "x"


@pytest.mark.slow
@pytest.mark.timeout(VENV_TIMEOUT_S)
def test_client_distribution_offers_the_client_verbs_only(client_venv: Path) -> None:
    """Its `tokenwire` command has `generate` (and `edge`), not the server's `serve` or `up`."""
    command = client_venv / "bin" / "tokenwire"
    generate = _run(command, "generate", "--help", cwd=client_venv)
    serve = _run(command, "serve", "--help", cwd=client_venv)
    assert generate.returncode == 0, generate.stderr
    assert "--target" in generate.stdout
    assert serve.returncode == 2
    assert "invalid choice: 'serve'" in serve.stderr


@pytest.mark.slow
@pytest.mark.timeout(VENV_TIMEOUT_S)
def test_edge_verb_without_the_edge_extra_says_how_to_get_it(client_venv: Path) -> None:
    """Without the [edge] extra, `tokenwire edge` exits 2 and names the extra to install."""
    edge = _run(client_venv / "bin" / "tokenwire", "edge", cwd=client_venv)
    assert edge.returncode == 2
    assert "pip install './clients[edge]'" in edge.stderr


@pytest.mark.slow
def test_runtime_install_brings_no_test_tools(tmp_path: Path) -> None:
    """What `make run` installs (`./clients[edge]` and `.`, without extras) resolves to the
    server, the client and their runtime libraries: no pytest, mypy, playwright or ruff."""
    for part in ("clients", "protos", "common", "service"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=SKIP)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    report = tmp_path / "report.json"
    resolved = _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        report,
        "./clients[edge]",
        ".",
        cwd=tmp_path,
        timeout=90,
    )
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"tokenwire", "tokenwire-client", "onnxruntime-gpu", "starlette"} <= names
    assert sorted(names & set(TEST_TOOLS)) == []


@pytest.mark.parametrize("name", ["service", "clients", "tokenwire_cli"])
def test_full_install_has_no_generic_top_level_names(name: str, tmp_path: Path) -> None:
    """Outside the checkout, the installed environment offers no `service`, `clients` or
    `tokenwire_cli` module."""
    imported = _run(sys.executable, "-c", f"import {name}", cwd=tmp_path)
    assert imported.returncode == 1
    assert f"No module named {name!r}" in imported.stderr


def test_full_install_imports_every_part_under_tokenwire(tmp_path: Path) -> None:
    """`tokenwire.server`, `tokenwire.client`, `tokenwire.edge` and `tokenwire.v1` import."""
    code = (
        "import tokenwire.server, tokenwire.client, tokenwire.edge.app, tokenwire.v1.generate_pb2"
    )
    imported = _run(sys.executable, "-c", code, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr


@pytest.mark.parametrize("folder", ["service", "clients"])
def test_folders_refuse_to_load_under_their_folder_names(folder: str) -> None:
    """From the repository root (on sys.path there), `import service` / `import clients` fail
    rather than load every module a second time."""
    imported = _run(sys.executable, "-c", f"import {folder}", cwd=ROOT)
    assert imported.returncode == 1
    assert f"not {folder}" in imported.stderr


def test_one_command_gathers_the_verbs_of_both_distributions(tmp_path: Path) -> None:
    """The full install's `tokenwire` lists the client's and the server's verbs."""
    listed = _run(sys.executable, "-m", "tokenwire.client.command", "--help", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for verb in ("edge", "generate", "serve", "up"):
        assert f"    {verb} " in listed.stdout
