"""`prepare` run on a dataset copy a test made, and what it wrote: shared by the adapter tests."""

from __future__ import annotations

from pathlib import Path

from medlava.config import load_config
from medlava.io import read_jsonl
from medlava.stages.prepare import run as run_prepare

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"


def prepare_dataset(dataset: str, tmp: Path, root: Path, *overrides: str, run_id: str = "r") -> Path:
    """The prepare run directory of `dataset` at `root` under the tiny recipe, outputs in `tmp`/runs."""
    cfg = load_config(TINY, [f"data.dataset={dataset}", "data.synthetic=null", f"data.root={root}",
                             f"output_root={tmp / 'runs'}", f"run_id={run_id}", *overrides])
    return run_prepare(cfg)


def rows(run: Path) -> dict[str, list[dict]]:
    return {s: list(read_jsonl(run / f"{s}.jsonl")) for s in ("train", "val", "test")}
