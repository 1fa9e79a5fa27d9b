"""What the training loops (the VLM's in loop.py, the CNN's in cnn.py) share: DDP wrapping, checkpoint listing, the
settings a checkpoint records and a resume must match, the stop at a non-finite loss, stop-and-requeue, the progress
bar and the TensorBoard writer."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from medlava import signals
from medlava.artifacts import read_manifest
from medlava.config import ConfigError, changed_settings
from medlava.distributed import Dist, any_rank
from medlava.runs import is_complete

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


RUN_ONLY = frozenset({"resume", "save_every", "log_every", "num_workers", "gradient_checkpointing"})
"""Section keys that change how a run goes, not the weights it reaches."""


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: the training samples a checkpoint was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """A (nested) section's values under dotted keys, as overrides name them (`sft.lora.r`)."""
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in flatten(f"{prefix}.{name}", item).items()}
    return {prefix: value}


def weight_settings(key: str, section: Any, drop: tuple[str, ...] = (), **more: Any) -> dict[str, Any]:
    """What decides a run's weights, as dotted keys: the `key` section's own (but RUN_ONLY and `drop`) and `more`
    (the model's, the data's digests, the resolved inputs). Each checkpoint records them; a resume must match them."""
    own = {k: v for k, v in section.model_dump(mode="json").items() if k not in RUN_ONLY | set(drop)}
    return {**flatten(key, own), **more}


def settings_record(settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that record `settings`: them, and their hash for a quick comparison."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return {"settings": settings, "settings_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


def check_resume(run: Path, prefix: str, settings: dict[str, Any], resume: str) -> None:
    """ConfigError when the checkpoint a resume would continue from was trained with other settings, naming the keys
    that differ. Call it before runs.start_run, so that a refused run's config.yaml is not rewritten (start_run refuses
    a complete run itself)."""
    done = checkpoint_dirs(run, prefix)
    if resume != "auto" or not done or is_complete(run):
        return
    recorded = read_manifest(done[-1]).get("settings")
    if recorded is None:  # written before checkpoints recorded their settings
        log.warning("%s records no settings: resuming without checking them", done[-1])
        return
    if changed := changed_settings(recorded, settings):
        raise ConfigError(f"{done[-1]} was trained with other settings ({'; '.join(changed)}); resuming it with "
                          "these would mix two trainings in one set of weights: relaunch with its settings "
                          f"({run / 'config.yaml'}), or leave run_id unset to train a new run")


def check_finite(loss: float, step: int, last: tuple[int, float] | None, key: str,
                 value: float) -> tuple[int, float]:
    """(step, loss) when the loss is finite; else ConfigError naming the step, the last finite loss and the setting
    most likely at fault (`key`, now `value`). Given the rank-averaged loss, every rank stops at the same step, before
    that step's checkpoint, and the run is not marked complete."""
    if math.isfinite(loss):
        return step, loss
    before = f"the last finite loss was {last[1]:.4g} at step {last[0]}" if last else "no finite loss before it"
    raise ConfigError(f"training diverged: the loss is {loss} at step {step} ({before}); no checkpoint of it is "
                      f"written and the run is not complete. Lower {key} (now {value:g}) and train a new run_id")


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


def tensorboard(run: Path, purge_step: int, d: Dist) -> SummaryWriter | None:
    """Rank 0's writer; events after `purge_step` (from before a resume) are dropped."""
    return SummaryWriter(str(run / "tensorboard"), purge_step=purge_step) if d.main else None
