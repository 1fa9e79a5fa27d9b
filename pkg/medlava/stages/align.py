"""The `align` stage: projector only on the `plain` template, vision tower and LLM frozen (LLaVA's
tune_mm_mlp_adapter)."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, run_dir, start_run
from medlava.stages import STAGES


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.models.kernels import check_kernels
    from medlava.train.checkpoint import check_resume
    from medlava.train.vlm import train_vlm, weight_settings

    check_kernels(cfg.align.kernels, dist.device, "align")  # before a run directory exists
    prepared = resolve(cfg, cfg.data.samples, "prepare")
    settings = weight_settings(cfg, "align", prepared, None, dist.world_size)
    check_resume(run_dir(cfg, "align"), dist, cfg.align.resume, settings)  # before start_run rewrites config.yaml
    run = start_run(cfg, "align", dist.rank, *STAGES["align"].reuse(cfg))
    ckpt, info = train_vlm(cfg, "align", dist, run, prepared, None, settings)
    if dist.main:
        mark_complete(run, {"checkpoint": str(ckpt.relative_to(run)), **info})
    return run
