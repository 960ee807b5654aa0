"""The package's layers hold (pyproject.toml's import-linter contracts, which `make lint` runs
too), and an import against them is caught: a copy of the package where the method imports the
training loop, or where two modules import each other, breaks its contract."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`, with the repository's contracts."""
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    command = [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "apollo_ray", tmp_path / "apollo_ray")
    return tmp_path


def add_import(path: Path, line: str) -> None:
    text = path.read_text()
    head, _, rest = text.partition("from __future__ import annotations\n")
    path.write_text(f"{head}from __future__ import annotations\n\n{line}\n{rest}")


def test_the_layers_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_method_importing_the_trainer_breaks_the_layers(package_copy: Path):
    add_import(
        package_copy / "apollo_ray/method/growth.py",
        "from apollo_ray.training.trainer import Trainer  # noqa: F401",
    )
    result = lint(package_copy)
    assert result.returncode == 1, result.stdout
    assert "Layers: the commands on top, the method at the bottom BROKEN" in result.stdout
    assert "apollo_ray.method.growth -> apollo_ray.training.trainer" in result.stdout


def test_a_cycle_between_modules_is_caught(package_copy: Path):
    add_import(
        package_copy / "apollo_ray/yardstick/frontier.py",
        "from apollo_ray.yardstick import stats  # noqa: F401",
    )
    add_import(
        package_copy / "apollo_ray/yardstick/stats.py",
        "from apollo_ray.yardstick import frontier  # noqa: F401",
    )
    result = lint(package_copy)
    assert result.returncode == 1, result.stdout
    assert "No import cycle, between the sub-packages or between the modules of one BROKEN" in (
        result.stdout
    )


def test_every_import_of_ours_resolves():
    """Every `from apollo_ray... import name` in the package names a module or attribute that
    exists, the imports inside functions too (the commands import their heavy modules late, and
    import-linter reads an import of a module that is not there as one of the package)."""
    import ast
    import importlib

    missing = []
    for path in sorted((ROOT / "apollo_ray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0):
                continue
            if not (node.module or "").startswith("apollo_ray"):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {alias.name}")
    assert not missing, missing
