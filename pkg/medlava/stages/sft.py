"""The `sft` stage: LoRA on the language model (peft) or a full fine-tune, projector and vision tower switchable,
starting from the aligned projector (sft.init_from)."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.train.vlm import train_vlm

    return train_vlm(cfg, "sft", dist)
