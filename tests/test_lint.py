"""`make lint`: the import contracts (setup.cfg [importlinter]) and ruff's rules and format (pyproject.toml) hold on
this tree, and they catch what they are for: an upward import (even one inside a function), an import circle, an
unused import, code the formatter would rewrite."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
RUFF = Path(sys.executable).with_name("ruff")
LINTED = ("pkg", "tests", "bench", "launch")


def lint(pkg_root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """lint-imports with setup.cfg's contracts over the medlava package found under `pkg_root`."""
    env = {**os.environ, "PYTHONPATH": str(pkg_root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(ROOT / "setup.cfg")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def planted(tmp_path):
    """A copy of the package to plant bad imports in."""
    shutil.copytree(
        ROOT / "pkg" / "medlava", tmp_path / "pkg" / "medlava", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path / "pkg"


def plant(pkg: Path, module: str, line: str) -> None:
    path = pkg.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}  # noqa\n")


def test_contracts_hold_on_this_tree(tmp_path):
    out = lint(ROOT / "pkg", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(planted, tmp_path):
    plant(planted, "medlava.models.llava", "from medlava.train.loop import train")
    out = lint(planted, tmp_path)
    assert out.returncode == 1
    assert "medlava.models is not allowed to import medlava.train" in out.stdout
    assert "medlava.models.llava -> medlava.train.loop" in out.stdout


def test_cluster_may_not_reach_model_code(planted, tmp_path):
    plant(planted, "medlava.cluster.jobs", "import medlava.data.samples")
    out = lint(planted, tmp_path)
    assert out.returncode == 1 and "medlava.cluster imports no model" in out.stdout and "BROKEN" in out.stdout


def test_a_circle_between_siblings_breaks_the_build(planted, tmp_path):
    plant(planted, "medlava.train.checkpoint", "from medlava.train.loop import train")
    out = lint(planted, tmp_path)
    assert out.returncode == 1 and "No cycles are allowed in medlava.train" in out.stdout


def ruff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUFF), *args], cwd=cwd, capture_output=True, text=True)


def test_ruff_rules_and_format_hold_on_this_tree():
    for args in (("check", *LINTED), ("format", "--check", *LINTED)):
        out = ruff(*args, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_catches_an_unused_import_and_unformatted_code(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("import os\n\n\ndef f(l):\n    return {'a':l}\n")
    check = ruff("check", "--output-format", "concise", "pkg", cwd=tmp_path)
    assert check.returncode == 1
    assert "F401 [*] `os` imported but unused" in check.stdout and "E741 Ambiguous variable name: `l`" in check.stdout
    fmt = ruff("format", "--check", "pkg", cwd=tmp_path)
    assert fmt.returncode == 1 and "--> pkg/m.py:5" in fmt.stdout and "1 file would be reformatted" in fmt.stdout
