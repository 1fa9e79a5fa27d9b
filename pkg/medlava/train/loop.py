"""The one step loop behind every training stage (align, sft, cnn, pretrain): epochs of optimizer steps, the
rank-averaged metrics to TensorBoard and the progress bar, a checkpoint every `save_every` steps and at the end,
and a stop request (SIGUSR2 on any rank) answered at the next step: every rank stops at the same step, a
checkpoint is saved and the process exits for requeue; a re-run resumes from it exactly. A non-finite loss stops it
at that step, before its checkpoint (runtime.check_finite).

What is trained is a Task (the VLM's in train/vlm.py, the CNN's in train/cnn.py, CLIP's in pretrain/loop.py): it
says how many steps an epoch has, gives this rank's batches of an epoch from a position, takes one optimizer
step, saves a checkpoint, and may close an epoch (the CNN validates, keeps the best and stops early).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from medlava import signals
from medlava.distributed import Dist, mean_over_ranks
from medlava.train import runtime
from medlava.train.checkpoint import Checkpointer
from medlava.train.validation import log_validation

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where a loop is; what a checkpoint stores to resume. Steps count optimizer updates."""

    step: int = 0
    epoch: int = 0
    in_epoch: int = 0
    """Steps done in `epoch`."""
    done: bool = False

    def state(self) -> dict:
        return asdict(self)


@dataclass
class StepMetrics:
    """What one optimizer step measured on this rank (the loop averages it over ranks)."""

    loss: float
    samples: int
    seconds: float
    waited: float = 0.0
    """Seconds spent waiting for the loader (> 0 when it cannot keep up: raise num_workers)."""
    tokens: int | None = None
    grad_norm: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    """Further per-step scalars, logged as train/<key> (means over ranks)."""


@dataclass(frozen=True)
class Schedule:
    total: int | None
    """Steps in all; None: until the task closes the run at an epoch's end (the CNN's early stopping)."""
    save_every: int | None
    log_every: int
    desc: str
    lr_setting: str
    """The learning rate to lower when the loss diverges, with its value (`sft.lr (now 0.002)`)."""
    eval_every: int | None = None
    validate: Callable[[], dict[str, float]] | None = None
    """Run every `eval_every` steps and at the end (align/sft's validation, train/validation.py), on every rank."""


class Task(Protocol):
    steps_per_epoch: int

    def batches(self, epoch: int, skip: int) -> Iterator:
        """This rank's batches of `epoch` from its `skip`-th step on."""

    def step(self, batches: Iterator, pos: Position) -> StepMetrics:
        """One optimizer step on the next batch(es)."""

    def lrs(self) -> dict[str, float]:
        """The learning rate of each named parameter group (`model`, `projector`)."""

    def save(self, pos: Position) -> Path:
        """A checkpoint of the state at `pos` (every rank calls it)."""

    def restore(self, ckpt: Path, state: dict) -> Position:
        """The weights and optimizer state of `ckpt` (its STATE read as `state`); where the loop was."""

    def end_epoch(self, pos: Position, losses: list[float], writer) -> Path | None:
        """After an epoch's last step (`pos.epoch` counts it): validation (to rank 0's TensorBoard `writer`), a
        checkpoint, `pos.done`; the checkpoint it saved, if any. A task without validation returns None."""


def log_step(
    writer, pos: Position, epoch: float, m: StepMetrics, lrs: dict[str, float], dist: Dist
) -> dict[str, float]:
    """A step's rank means to TensorBoard (writer None: not this step); what the progress bar shows."""
    keys = sorted(m.extra)
    loss, samples_s, tokens_s, wait, *extra = mean_over_ranks(
        [m.loss, m.samples / m.seconds, (m.tokens or 0) / m.seconds, m.waited / m.seconds, *(m.extra[k] for k in keys)],
        dist,
    )
    scalars = {
        "loss": loss,
        "samples_per_s": samples_s * dist.world_size,
        "data_wait_fraction": wait,
        "epoch": epoch,
        "lr": lrs.get("model", next(iter(lrs.values()))),
        **dict(zip(keys, extra)),
    }
    if m.tokens is not None:
        scalars["tokens_per_s"] = tokens_s * dist.world_size
    if m.grad_norm is not None:
        scalars["grad_norm"] = m.grad_norm
    if "projector" in lrs and "model" in lrs:
        scalars["lr_projector"] = lrs["projector"]
    if writer:
        for key, value in scalars.items():
            writer.add_scalar(f"train/{key}", value, pos.step)
    return {"loss": loss, **({"tok_s": scalars["tokens_per_s"]} if m.tokens is not None else {})}


def train(task: Task, pos: Position, s: Schedule, run: Path, dist: Dist) -> Path | None:
    """Run `task` from `pos` to the end of the schedule; the last checkpoint saved (None when none was)."""
    signals.install()
    if s.total is not None:  # a step-counted schedule is done at its total (which a re-run may have raised)
        pos.done = pos.step >= s.total
    writer = runtime.tensorboard(run, pos.step + 1, dist)
    bar = runtime.progress(s.total, pos.step, s.desc, dist)
    last, saved_at, finite = None, -1, None
    while not pos.done:
        epoch = pos.epoch
        batches, losses = task.batches(epoch, pos.in_epoch), []
        while pos.epoch == epoch and not pos.done:
            m = task.step(batches, pos)
            pos.step, pos.in_epoch = pos.step + 1, pos.in_epoch + 1
            pos.done = s.total is not None and pos.step >= s.total
            shown = log_step(
                writer if pos.step % s.log_every == 0 or pos.done else None,
                pos,
                epoch + pos.in_epoch / task.steps_per_epoch,
                m,
                task.lrs(),
                dist,
            )
            losses.append(shown["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{shown['loss']:.4f}", **{k: f"{v:.0f}" for k, v in shown.items() if k != "loss"})
            finite = runtime.check_finite(shown["loss"], pos.step, finite, s.lr_setting)
            if pos.in_epoch == task.steps_per_epoch:
                pos.epoch, pos.in_epoch = pos.epoch + 1, 0
                if (closed := task.end_epoch(pos, losses, writer)) is not None:
                    last, saved_at = closed, pos.step
            if s.validate is not None and (pos.step % s.eval_every == 0 or pos.done):
                result = s.validate()
                if dist.main:
                    log_validation(pos.step, result, writer, bar.write)
            stop = runtime.stop_requested(dist) and not pos.done
            if (stop or pos.done or (s.save_every and pos.step % s.save_every == 0)) and saved_at != pos.step:
                last, saved_at = task.save(pos), pos.step
            if stop:
                runtime.exit_for_requeue(f"at step {pos.step}" + (f" of {s.total}" if s.total else ""), writer)
    bar.close()
    if writer:
        writer.close()
    return last


def resume_and_train(
    task: Task, checkpointer: Checkpointer, resume: bool, seed: int, s: Schedule, run: Path, dist: Dist
) -> Path | None:
    """Continue `task` from the newest checkpoint of `run` (when `resume` and there is one), then train it to the
    end of the schedule; the final checkpoint."""
    pos, resumed = Position(), None
    if resume and (found := checkpointer.resume(seed)):
        resumed, state = found
        pos = task.restore(resumed, state)
        log.info("resumed from %s at step %d%s", resumed, pos.step, f" of {s.total}" if s.total else "")
    return train(task, pos, s, run, dist) or resumed
