"""What the step loop and its tasks share besides checkpoints: DDP wrapping, what decides a run's weights, the stop at
a non-finite loss, stop-and-requeue, the progress bar and the TensorBoard writer."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from medlava import signals
from medlava.config import ConfigError
from medlava.distributed import Dist, any_rank

log = logging.getLogger(__name__)


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DDP over the ranks, or the model itself in a single process."""
    if dist.world_size == 1:
        return model
    device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


RUN_ONLY = frozenset(
    {"resume", "save_every", "keep_last", "log_every", "num_workers", "gradient_checkpointing", "compile", "kernels"}
)
"""Section keys that change how a run goes (or how fast), not the weights it reaches."""


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """A (nested) section's values under dotted keys, as overrides name them (`sft.lora.r`)."""
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in flatten(f"{prefix}.{name}", item).items()}
    return {prefix: value}


def weight_settings(key: str, section: Any, drop: tuple[str, ...] = (), **more: Any) -> dict[str, Any]:
    """What decides a run's weights, as dotted keys: the `key` section's own (but RUN_ONLY and `drop`) and `more`
    (the model's, the data's digests, the resolved inputs). Each checkpoint records them (train.checkpoint) and a
    resume must match them."""
    own = {k: v for k, v in section.model_dump(mode="json").items() if k not in RUN_ONLY | set(drop)}
    return {**flatten(key, own), **more}


def check_finite(loss: float, step: int, last: tuple[int, float] | None, lr_setting: str) -> tuple[int, float]:
    """(step, loss) when the loss is finite; else ConfigError naming the step, the last finite loss and the setting to
    lower (`lr_setting`, with its value). Given the rank-averaged loss, every rank stops at the same step, before that
    step's checkpoint, and the run is not marked complete."""
    if math.isfinite(loss):
        return step, loss
    before = f"the last finite loss was {last[1]:.4g} at step {last[0]}" if last else "no finite loss before it"
    raise ConfigError(
        f"training diverged: the loss is {loss} at step {step} ({before}); no checkpoint of it is "
        f"written and the run is not complete. Lower {lr_setting} and train a new run_id"
    )


def stop_requested(dist: Dist) -> bool:
    """A stop (SIGUSR2) requested on any rank: every rank sees it at the same step."""
    return any_rank(signals.requested(), dist)


def exit_for_requeue(where: str, writer: SummaryWriter | None = None) -> NoReturn:
    if writer:
        writer.close()
    log.warning("stop requested: checkpoint saved %s; exiting for requeue", where)
    raise SystemExit(signals.EXIT_REQUEUE)


def progress(total: int | None, initial: int, desc: str, dist: Dist) -> tqdm:
    """A progress bar on rank 0; in a log file (no terminal) it updates every 30 s, not every step."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not dist.main,
        dynamic_ncols=True,
        mininterval=1 if sys.stderr.isatty() else 30,
    )


def tensorboard(run: Path, purge_step: int | None, dist: Dist) -> SummaryWriter | None:
    """Rank 0's writer; events after `purge_step` (from before a resume) are dropped (None: none are)."""
    return SummaryWriter(str(run / "tensorboard"), purge_step=purge_step) if dist.main else None
