"""The `pretrain` stage: CLIP-style contrastive image-text pretraining with open_clip on the prepared
samples' image-caption pairs, scored by retrieval recall@K and zero-shot classification (medlava.pretrain)."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, start_run


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.pretrain.loop import run_pretrain

    run = start_run(cfg, "pretrain", dist.rank)
    result = run_pretrain(cfg, dist, run, resolve(cfg, cfg.data.samples, "prepare"))
    if dist.main:
        mark_complete(run, result)
    return run
