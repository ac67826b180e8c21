"""The bundled model is what its build script makes: `make model` rebuilds it as it ships."""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _flag_defaults(script: Path) -> dict[str, object]:
    """Each `ap.add_argument("--flag", ..., default=<constant>)` of the script, by the
    argparse name of its flag."""
    defaults: dict[str, object] = {}
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        flag = node.args[0]
        default = next((k.value for k in node.keywords if k.arg == "default"), None)
        if isinstance(flag, ast.Constant) and isinstance(default, ast.Constant):
            defaults[str(flag.value).removeprefix("--").replace("-", "_")] = default.value
    return defaults


def test_the_bundled_models_hyperparameters_are_its_build_scripts_defaults() -> None:
    """models/tiny-py/MANIFEST.json records the settings the shipped model was built with;
    models/build_tiny.py, run with no flags as `make model` runs it, uses the same ones."""
    manifest = json.loads((ROOT / "models" / "tiny-py" / "MANIFEST.json").read_text())
    defaults = _flag_defaults(ROOT / "models" / "build_tiny.py")
    built = manifest["hyperparameters"]
    differ = {k: (v, defaults.get(k)) for k, v in built.items() if k != "name"}
    assert {k: v for k, v in differ.items() if v[0] != v[1]} == {}
