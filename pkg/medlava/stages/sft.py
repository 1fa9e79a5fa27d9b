"""The `sft` stage: LoRA on the language model (peft) or a full fine-tune, projector and vision tower switchable,
starting from the aligned projector (sft.init_from)."""

from __future__ import annotations

from pathlib import Path

from medlava.artifacts import checkpoint_of
from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, run_dir, start_run
from medlava.stages import STAGES, upstream


def init_checkpoint(cfg: Config) -> Path | None:
    """The aligned projector sft starts from (sft.init_from), or None."""
    if cfg.sft.init_from == "none":
        return None
    return checkpoint_of(resolve(cfg, cfg.sft.init_from, upstream("sft")))


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.models.kernels import check_kernels
    from medlava.train.checkpoint import check_resume
    from medlava.train.vlm import train_vlm, weight_settings

    check_kernels(cfg.sft.kernels, dist.device, "sft")  # before a run directory exists
    prepared, init = resolve(cfg, cfg.data.samples, "prepare"), init_checkpoint(cfg)
    settings = weight_settings(cfg, "sft", prepared, init, dist.world_size)
    check_resume(run_dir(cfg, "sft"), dist, cfg.sft.resume, settings)  # before start_run rewrites config.yaml
    run = start_run(cfg, "sft", dist.rank, *STAGES["sft"].reuse(cfg))
    ckpt, info = train_vlm(cfg, "sft", dist, run, prepared, init, settings)
    if dist.main:
        mark_complete(run, {"checkpoint": str(ckpt.relative_to(run)), **info})
    return run
