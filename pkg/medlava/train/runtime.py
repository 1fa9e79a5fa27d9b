"""What the step loop and its tasks share besides checkpoints: DDP wrapping, stop-and-requeue, the progress bar and
the TensorBoard writer."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from medlava import signals
from medlava.distributed import Dist, any_rank

log = logging.getLogger(__name__)


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP over the ranks, or the model itself in a single process."""
    if d.world_size == 1:
        return model
    device_ids = [d.local_rank] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def stop_requested(d: Dist) -> bool:
    """A stop (SIGUSR2) requested on any rank: every rank sees it at the same step."""
    return any_rank(signals.requested(), d)


def exit_for_requeue(where: str, writer: SummaryWriter | None = None) -> NoReturn:
    if writer:
        writer.close()
    log.warning("stop requested: checkpoint saved %s; exiting for requeue", where)
    raise SystemExit(signals.EXIT_REQUEUE)


def progress(total: int | None, initial: int, desc: str, d: Dist) -> tqdm:
    """A progress bar on rank 0; in a log file (no terminal) it updates every 30 s, not every step."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not d.main, dynamic_ncols=True,
                mininterval=1 if sys.stderr.isatty() else 30)


def tensorboard(run: Path, purge_step: int | None, d: Dist) -> SummaryWriter | None:
    """Rank 0's writer; events after `purge_step` (from before a resume) are dropped (None: none are)."""
    return SummaryWriter(str(run / "tensorboard"), purge_step=purge_step) if d.main else None
