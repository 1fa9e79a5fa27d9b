"""The `pretrain` stage: CLIP-style contrastive image-text pretraining with open_clip on the prepared
samples' image-caption pairs, scored by retrieval recall@K and zero-shot classification (medlava.pretrain)."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.pretrain.loop import run_pretrain

    return run_pretrain(cfg, dist)
