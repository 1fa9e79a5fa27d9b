"""The `sft` stage: LoRA on the language model (peft) or a full fine-tune, projector and vision tower switchable,
starting from the aligned projector (sft.init_from)."""

from __future__ import annotations

from pathlib import Path

from medlava.artifacts import checkpoint_of
from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import resolve
from medlava.stages import align, upstream


def init_checkpoint(cfg: Config) -> Path | None:
    """The aligned projector sft starts from (sft.init_from), or None."""
    if cfg.sft.init_from == "none":
        return None
    return checkpoint_of(resolve(cfg, cfg.sft.init_from, upstream("sft")))


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.models.kernels import check_kernels

    check_kernels(cfg.sft.kernels, dist.device, "sft")  # before a run directory exists or an upstream run is read
    return align.train(cfg, dist, "sft", init_checkpoint(cfg))
