"""The architecture's layer rules (pyproject.toml's import contracts), checked by
import-linter on this tree, and shown to catch an upward import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT

LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
        "lint_imports_command()", "--config", str(ROOT / "pyproject.toml")]


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LINT, "--no-cache"], cwd=tree, env={"PYTHONPATH": str(tree)},
                          capture_output=True, text=True, timeout=300)


def test_every_layer_imports_only_the_layers_below_it() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The engine importing the app's settings (as engine/batching.py once did) fails."""
    for package in ("service", "contract", "training", "export"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    batching = tmp_path / "service" / "engine" / "batching.py"
    batching.write_text(batching.read_text() + "\nfrom service.app.settings import "
                        "ServiceSettings  # noqa: E402\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "service.engine is not allowed to import service.app" in result.stdout
    assert "service.engine.batching -> service.app.settings" in result.stdout
