"""The `align` stage: projector only on the `plain` template, vision tower and LLM frozen (LLaVA's
tune_mm_mlp_adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, run_dir, start_run
from medlava.stages import STAGES


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.models.kernels import check_kernels

    check_kernels(cfg.align.kernels, dist.device, "align")  # before a run directory exists or an upstream run is read
    return train(cfg, dist, "align", None)


def train(cfg: Config, dist: Dist, stage: Literal["align", "sft"], init: Path | None) -> Path:
    """align's and sft's run: the upstream run and the resume checked before the run directory is written, then
    train_vlm from `init` (sft's aligned projector) and COMPLETE.json."""
    from medlava.train.checkpoint import check_resume
    from medlava.train.vlm import train_vlm, weight_settings

    t = cfg.align if stage == "align" else cfg.sft
    prepared = resolve(cfg, cfg.data.samples, "prepare")
    settings = weight_settings(cfg, stage, prepared, init, dist.world_size)
    check_resume(run_dir(cfg, stage), dist, t.resume, settings)  # before start_run rewrites config.yaml
    run = start_run(cfg, stage, dist.rank, *STAGES[stage].reuse(cfg))
    ckpt, info = train_vlm(cfg, stage, dist, run, prepared, init, settings)
    if dist.main:
        mark_complete(run, {"checkpoint": str(ckpt.relative_to(run)), **info})
    return run
