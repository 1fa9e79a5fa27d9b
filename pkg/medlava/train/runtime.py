"""What the training loops (the VLM's in loop.py, the CNN's in cnn.py) share: DDP wrapping, checkpoint listing, stop-and-requeue, the progress bar and the TensorBoard writer."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import NoReturn

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from medlava import signals
from medlava.distributed import Dist, any_rank

log = logging.getLogger(__name__)
STATE = "trainer_state.pt"
"""In every checkpoint directory a loop can resume from (optimizer, scheduler, position)."""


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP over the ranks, or the model itself in a single process."""
    if d.world_size == 1:
        return model
    device_ids = [d.local_rank] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def checkpoint_dirs(run: Path, prefix: str) -> list[Path]:
    """The complete checkpoints of `run`, `<prefix>-N` or `<prefix>-N-step-S` holding STATE, oldest first;
    anything else there (a user's step-100.bak copy) is not ours."""
    root = run / "checkpoints"
    found = [p for p in root.glob(f"{prefix}-*") if re.fullmatch(rf"{prefix}-\d+(-step-\d+)?", p.name)
             and (p / STATE).exists()] if root.exists() else []
    return sorted(found, key=lambda p: tuple(int(x) for x in p.name.split("-")[1::2]))


def stop_requested(d: Dist) -> bool:
    """A stop (SIGUSR2) requested on any rank: every rank sees it at the same step."""
    return any_rank(signals.requested(), d)


def save_or_stop(step: int, total: int, save_every: int | None, d: Dist) -> tuple[bool, bool]:
    """(save a checkpoint now, then exit for requeue) after `step` of a step-counted loop: save at the end,
    every `save_every` steps, and when a stop was requested on any rank before the end."""
    stop = stop_requested(d) and step < total
    return stop or step == total or bool(save_every and step % save_every == 0), stop


def exit_for_requeue(where: str, writer: SummaryWriter | None = None) -> NoReturn:
    if writer:
        writer.close()
    log.warning("stop requested: checkpoint saved %s; exiting for requeue", where)
    raise SystemExit(signals.EXIT_REQUEUE)


def progress(total: int, initial: int, desc: str, d: Dist) -> tqdm:
    """A progress bar on rank 0; in a log file (no terminal) it updates every 30 s, not every step."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not d.main, dynamic_ncols=True,
                mininterval=1 if sys.stderr.isatty() else 30)


def tensorboard(run: Path, purge_step: int | None, d: Dist) -> SummaryWriter | None:
    """Rank 0's writer; events after `purge_step` (from before a resume) are dropped (None: none are)."""
    return SummaryWriter(str(run / "tensorboard"), purge_step=purge_step) if d.main else None
