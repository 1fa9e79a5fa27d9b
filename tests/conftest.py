"""What many tests share: the repository's paths, the tiny recipes, and `prepare` runs on synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

from medlava.config import load_config
from medlava.io import read_jsonl
from medlava.stages.prepare import run as run_prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
TINY_CNN = ROOT / "jobs" / "configs" / "tiny_cnn.yaml"
TINY_PRETRAIN = ROOT / "jobs" / "configs" / "tiny_pretrain.yaml"


def torchrun(procs: int) -> list[str]:
    """`procs` processes on this machine under torchrun, as the node task starts them; a script or `-m` follows."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]


def prepare_dataset(dataset: str, tmp: Path, root: Path, *overrides: str, run_id: str = "r") -> Path:
    """The prepare run directory of `dataset` at `root` under the tiny recipe, outputs in `tmp`/runs."""
    cfg = load_config(
        TINY,
        [
            f"data.dataset={dataset}",
            "data.synthetic=null",
            f"data.root={root}",
            f"output_root={tmp / 'runs'}",
            f"run_id={run_id}",
            *overrides,
        ],
    )
    return run_prepare(cfg)


def rows(run: Path) -> dict[str, list[dict]]:
    return {s: list(read_jsonl(run / f"{s}.jsonl")) for s in ("train", "val", "test")}


def complete_runs(output_root: Path, *stages: str, run_id: str = "up", result: str = "{}") -> list[Path]:
    """Complete runs of `stages` (recipe name `tiny`) holding only COMPLETE.json: the upstream runs the launcher
    looks for at submit time, for launches that are only printed (--dry-run)."""
    runs = []
    for stage in stages:
        run = output_root / "tiny" / stage / run_id
        run.mkdir(parents=True)
        (run / "COMPLETE.json").write_text(result)
        runs.append(run)
    return runs
