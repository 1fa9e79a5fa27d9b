"""The `sft` stage: LoRA on the language model (peft) or a full fine-tune, projector and vision tower switchable,
starting from the aligned projector (sft.init_from)."""

from __future__ import annotations

from pathlib import Path

from medlava.artifacts import checkpoint_of
from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, start_run
from medlava.stages import upstream


def init_checkpoint(cfg: Config) -> Path | None:
    """The aligned projector sft starts from (sft.init_from), or None."""
    if cfg.sft.init_from == "none":
        return None
    return checkpoint_of(resolve(cfg, cfg.sft.init_from, upstream("sft")))


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.models.kernels import check_kernels
    from medlava.train.vlm import train_vlm

    check_kernels(cfg.sft.kernels, dist.device, "sft")  # before a run directory exists
    run = start_run(cfg, "sft", dist.rank, "always" if cfg.sft.resume == "auto" else "never",
                    " (or sft.resume=auto to continue it)")
    prepared = resolve(cfg, cfg.data.samples, "prepare")
    ckpt, info = train_vlm(cfg, "sft", dist, run, prepared, init_checkpoint(cfg))
    if dist.main:
        mark_complete(run, {"checkpoint": str(ckpt.relative_to(run)), **info})
    return run
