"""The `align` stage: projector only on the `plain` template, vision tower and LLM frozen (LLaVA's
tune_mm_mlp_adapter)."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, start_run


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.models.kernels import check_kernels
    from medlava.train.vlm import train_vlm

    check_kernels(cfg.align.kernels, dist.device, "align")  # before a run directory exists
    run = start_run(cfg, "align", dist.rank, "always" if cfg.align.resume == "auto" else "never",
                    " (or align.resume=auto to continue it)")
    ckpt, info = train_vlm(cfg, "align", dist, run, resolve(cfg, cfg.data.samples, "prepare"), init=None)
    if dist.main:
        mark_complete(run, {"checkpoint": str(ckpt.relative_to(run)), **info})
    return run
