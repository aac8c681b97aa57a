"""The package's shape, which the code review relies on: imports run one way, modules stay
short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

MAX_LINES = 500


def test_layers_import_one_way():
    """The import-linter contract in pyproject.toml (docs/module-map.md's layers) holds."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_module_has_a_layer():
    """A new module must take its place in the contract, or the contract would not check it."""
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ][0]
    listed = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "kdsweep").glob("*.py")
    }
    modules |= {
        f"kdsweep.{p.name}" for p in (ROOT / "kdsweep").iterdir() if (p / "__init__.py").exists()
    }
    assert modules - listed - {"kdsweep.__init__", "kdsweep.__main__"} == set()


def test_no_module_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "kdsweep").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, "split these modules along their concepts"
