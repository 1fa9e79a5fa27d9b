"""The `align` stage: projector only on the `plain` template, vision tower and LLM frozen (LLaVA's
tune_mm_mlp_adapter)."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.train.vlm import train_vlm

    return train_vlm(cfg, "align", dist)
