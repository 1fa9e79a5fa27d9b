"""The one training loop behind `align` and `sft`: AdamW with a separate projector learning rate, cosine
schedule with warm-up, gradient accumulation and clipping, mixed precision, DDP, TensorBoard, and
checkpoints that resume exactly (weights, optimizer, scheduler, RNG, data position)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from medlava import precision, signals
from medlava.config import TrainConfig
from medlava.distributed import Dist, ensure_process_group, mean_over_ranks
from medlava.models.inputs import (
    SampleDataset,
    collate,
    collate_packed,
    raise_batch_error,
)
from medlava.models.llava import enable_activation_checkpointing
from medlava.train import runtime
from medlava.train.checkpoint import load_resume_state, save_checkpoint
from medlava.train.optim import make_optimizer, param_groups
from medlava.train.sampling import epoch_indices
from medlava.train.validation import Validation, log_validation

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    """What the VLM loop holds: the model (unwrapped), what steps it (DDP or a DeepSpeed engine), the
    optimizer and schedule, and where it is."""
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: object  # a DeepSpeed engine, or None under plain DDP
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    total: int
    updates_per_epoch: int
    step: int = 0


def make_trainer(model: torch.nn.Module, t: TrainConfig, d: Dist, dtype: torch.dtype, n_samples: int) -> Trainer:
    per_epoch = math.ceil(math.ceil(n_samples / d.world_size) / t.batch_size)
    if per_epoch < t.grad_accum:
        raise ValueError(f"{n_samples} samples make {per_epoch} micro-batches per rank, fewer than "
                         f"grad_accum={t.grad_accum}: lower batch_size or grad_accum")
    updates_per_epoch = per_epoch // t.grad_accum  # a trailing partial window is dropped, as drop_last
    total = t.max_steps or max(1, math.ceil(t.epochs * updates_per_epoch))
    warmup = math.ceil(total * t.warmup_ratio)
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if t.deepspeed != "none":
        import deepspeed

        from medlava.train.deepspeed import deepspeed_config
        ensure_process_group(d)
        # DeepSpeed owns mixed precision, accumulation, clipping, the optimizer and the scheduler step.
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, t.lr, t.weight_decay, t.projector_lr),
            config=deepspeed_config(t, dtype),
            lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total))
        return Trainer(model, engine, optimizer, scheduler, engine, None, precision.grad_scaler(None), total,
                       updates_per_epoch)
    # Mixed precision keeps fp32 master copies of what trains; frozen weights stay in `dtype`.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.to(d.device)
    optimizer = make_optimizer(model, t.lr, t.weight_decay, t.projector_lr)
    amp = precision.autocast_dtype(dtype, d.device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    return Trainer(model, runtime.wrap_ddp(model, d), optimizer, scheduler, None, amp, precision.grad_scaler(amp), total,
                   updates_per_epoch)


def optimizer_step(tr: Trainer, batches, t: TrainConfig, d: Dist) -> dict[str, float]:
    """One update over grad_accum micro-batches; what it measured (summed over them)."""
    tic, losses, tokens, slots, samples, waited = time.perf_counter(), [], 0, 0, 0, 0.0
    for k in range(t.grad_accum):
        wait = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - wait  # > 0 when the loader cannot keep up (more num_workers)
        raise_batch_error(batch)
        batch = {key: v.to(d.device, non_blocking=True) for key, v in batch.items()}
        samples += int((batch["position_ids"] == 0).sum()) if t.packing else len(batch["input_ids"])
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        tokens, slots = tokens + real, slots + batch["input_ids"].numel()
        sync = k == t.grad_accum - 1 or not isinstance(tr.net, torch.nn.parallel.DistributedDataParallel)
        if tr.engine is not None:
            loss = tr.engine(**batch, use_cache=False).loss
            tr.engine.backward(loss)
            tr.engine.step()  # steps optimizer and scheduler only at the accumulation boundary
        else:
            with (nullcontext() if sync else tr.net.no_sync()), precision.autocast(d.device, tr.amp):
                loss = tr.net(**batch, use_cache=False).loss
                tr.scaler.scale(loss / t.grad_accum).backward()
        losses.append(loss.item())
    if tr.engine is not None:
        grad_norm = float(tr.engine.get_global_grad_norm() or 0.0)
    else:
        tr.scaler.unscale_(tr.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), t.max_grad_norm).item()
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        tr.scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return {"loss": sum(losses) / len(losses), "grad_norm": grad_norm, "tokens": tokens, "slots": slots,
            "samples": samples, "waited": waited, "seconds": time.perf_counter() - tic}


def log_step(writer, tr: Trainer, m: dict[str, float], d: Dist) -> dict[str, float]:
    """Rank-averaged loss and throughput of an update, to TensorBoard; returns what the bar shows."""
    s = m["seconds"]
    loss, tok_s, samples_s, wait_fraction = mean_over_ranks(
        [m["loss"], m["tokens"] / s, m["samples"] / s, m["waited"] / s], d)
    tok_s, samples_s, step = tok_s * d.world_size, samples_s * d.world_size, tr.step
    if writer:
        for key, value in (("loss", loss), ("grad_norm", m["grad_norm"]), ("tokens_per_s", tok_s),
                           ("samples_per_s", samples_s), ("data_wait_fraction", wait_fraction),
                           ("pad_fraction", 1 - m["tokens"] / m["slots"]), ("epoch", step / tr.updates_per_epoch)):
            writer.add_scalar(f"train/{key}", value, step)
        lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
        writer.add_scalar("train/lr", lrs.get("model", lrs.get("projector")), step)
        if "projector" in lrs and "model" in lrs:
            writer.add_scalar("train/lr_projector", lrs["projector"], step)
    return {"loss": f"{loss:.4f}", "tok_s": f"{tok_s:.0f}"}


def train(model: torch.nn.Module, processor, dataset: SampleDataset, t: TrainConfig, run: Path, d: Dist,
          kind: str, manifest: dict, dtype: torch.dtype, validation: Validation | None = None) -> Path:
    """Train `model` (trainable params already chosen) and return the final checkpoint directory.

    On a stop request (SIGUSR2 on any rank) every rank stops at the same step, rank 0 saves a
    checkpoint, and the process exits with signals.EXIT_REQUEUE; a re-run resumes from it."""
    signals.install()
    torch.manual_seed(t.seed + d.rank)
    tr = make_trainer(model, t, d, dtype, len(dataset))
    done = runtime.checkpoint_dirs(run, "step")
    if t.resume == "auto" and done:
        tr.step = load_resume_state(done[-1], model, tr.optimizer, tr.scheduler, d, tr.engine)["step"]
        log.info("resumed from %s at step %d of %d", done[-1], tr.step, tr.total)
    collate_fn = collate_packed if t.packing else partial(collate, pad_id=processor.tokenizer.pad_token_id,
                                                          side="right")
    writer = runtime.tensorboard(run, tr.step + 1, d)
    bar = runtime.progress(tr.total, tr.step, run.parent.name, d)
    ckpt = done[-1] if done and tr.step >= tr.total else None
    tr.net.train()
    while tr.step < tr.total:
        micro = tr.step * t.grad_accum  # micro-batches consumed so far
        epoch, skip = divmod(micro, tr.updates_per_epoch * t.grad_accum)
        indices = epoch_indices(len(dataset), t.seed, epoch, d, skip * t.batch_size, t.batch_size,
                                dataset.lengths() if t.group_by_length else None)
        batches = iter(torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, sampler=indices,
                                                   num_workers=t.num_workers, collate_fn=collate_fn,
                                                   pin_memory=d.device.type == "cuda"))
        while tr.step < min(tr.total, (epoch + 1) * tr.updates_per_epoch):
            measured = optimizer_step(tr, batches, t, d)
            logged = writer if tr.step % t.log_every == 0 or tr.step == tr.total else None
            bar.set_postfix(**log_step(logged, tr, measured, d))
            bar.update(1)
            if validation is not None and (tr.step % t.eval_every == 0 or tr.step == tr.total):
                result = validation.measure(tr.engine or tr.model, d, tr.amp)
                if d.main:
                    log_validation(tr.step, result, writer, bar.write)
            save, stop = runtime.save_or_stop(tr.step, tr.total, t.save_every, d)
            if save:
                ckpt = save_checkpoint(run, tr.step, model, processor, kind, manifest, tr.optimizer, tr.scheduler,
                                       {"total": tr.total}, d, tr.engine)
            if stop:
                runtime.exit_for_requeue(f"at step {tr.step} of {tr.total}", writer)
    bar.close()
    if writer:
        writer.close()
    return ckpt if ckpt is not None else run / "checkpoints" / f"step-{tr.total:06d}"
