"""The `pretrain` stage: CLIP-style contrastive image-text pretraining with open_clip on the prepared
samples' image-caption pairs, scored by retrieval recall@K and zero-shot classification (medlava.pretrain)."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, run_dir, start_run
from medlava.stages import STAGES


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.pretrain.loop import run_pretrain, weight_settings
    from medlava.train.checkpoint import check_resume

    prepared = resolve(cfg, cfg.data.samples, "prepare")
    settings = weight_settings(cfg, prepared)
    check_resume(run_dir(cfg, "pretrain"), dist, cfg.pretrain.resume, settings)  # before start_run rewrites config.yaml
    run = start_run(cfg, "pretrain", dist.rank, *STAGES["pretrain"].reuse(cfg))
    result = run_pretrain(cfg, dist, run, prepared, settings)
    if dist.main:
        mark_complete(run, result)
    return run
