"""`make lint`'s import contracts (setup.cfg [importlinter]): they hold on this tree, and they catch what they are
for: an upward import (even one inside a function) and an import circle."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


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
