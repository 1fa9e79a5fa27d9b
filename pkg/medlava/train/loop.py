"""The one training loop behind `align` and `sft`: AdamW with a separate projector learning rate, cosine
schedule with warm-up, gradient accumulation and clipping, mixed precision, DDP, TensorBoard, and
checkpoints that resume exactly (weights, optimizer, scheduler, RNG, data position)."""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from medlava import signals
from medlava.config import TrainConfig
from medlava.distributed import Dist, any_rank, ensure_process_group, mean_over_ranks
from medlava.models.inputs import SampleDataset, collate, collate_packed, raise_batch_error
from medlava.models.llava import PROJECTOR, enable_activation_checkpointing
from medlava.train.checkpoint import checkpoint_dirs, load_resume_state, save_checkpoint

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict]:
    """Projector params may take their own lr; biases and norms get no weight decay (as LLaVA)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((PROJECTOR in name, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": (t.projector_lr or t.lr) if proj else t.lr,
             "weight_decay": t.weight_decay if decay else 0.0, "name": ("projector" if proj else "model")}
            for (proj, decay), ps in sorted(groups.items())]


def epoch_indices(n: int, seed: int, epoch: int, d: Dist, skip: int, batch_size: int,
                  lengths: list[int] | None = None) -> list[int]:
    """This rank's sample order for an epoch, from `skip` on. By hand because DistributedSampler can
    neither start mid-epoch (exact resume) nor group by length.

    With `lengths`, batches are length-grouped as HF's group_by_length: a random permutation is cut into
    megabatches of 50 global batches, each sorted by length, so a batch holds samples of similar length
    (less padding) while batch order stays random."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    order += order[: (-len(order)) % d.world_size]  # equal shards, as DistributedSampler pads
    if lengths is None:
        return order[d.rank :: d.world_size][skip:]
    global_batch = batch_size * d.world_size
    mega = global_batch * 50
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
    # Only the very last batch can be short; it stays last so every rank's batches stay aligned.
    full = len(batches) - (len(batches[-1]) < global_batch)
    perm = torch.randperm(full, generator=g).tolist() + list(range(full, len(batches)))
    return [j for b in perm for j in batches[b][d.rank :: d.world_size]][skip:]


def train(model: torch.nn.Module, processor, dataset: SampleDataset, t: TrainConfig, run: Path, d: Dist,
          kind: str, manifest: dict, dtype: torch.dtype) -> Path:
    """Train `model` (trainable params already chosen) and return the final checkpoint directory.

    On a stop request (SIGUSR2 on any rank) every rank stops at the same step, rank 0 saves a
    checkpoint, and the process exits with signals.EXIT_REQUEUE; a re-run resumes from it."""
    signals.install()
    torch.manual_seed(t.seed + d.rank)
    per_epoch = math.ceil(math.ceil(len(dataset) / d.world_size) / t.batch_size)
    if per_epoch < t.grad_accum:
        raise ValueError(f"{len(dataset)} samples make {per_epoch} micro-batches per rank, fewer than "
                         f"grad_accum={t.grad_accum}: lower batch_size or grad_accum")
    updates_per_epoch = per_epoch // t.grad_accum  # a trailing partial window is dropped, as drop_last
    total = t.max_steps or max(1, math.ceil(t.epochs * updates_per_epoch))
    warmup = math.ceil(total * t.warmup_ratio)

    if t.gradient_checkpointing:
        enable_activation_checkpointing(model)
    engine = None
    if t.deepspeed != "none":
        import deepspeed

        from medlava.train.deepspeed import deepspeed_config
        ensure_process_group(d)
        # DeepSpeed owns mixed precision, accumulation, clipping, the optimizer and the scheduler step.
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, t),
            config=deepspeed_config(t, dtype),
            lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total))
        net, use_amp = engine, False
    else:
        # Mixed precision keeps fp32 master copies of what trains; frozen weights stay in `dtype`.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.to(d.device)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world_size > 1 else model
        optimizer = torch.optim.AdamW(param_groups(model, t), betas=(0.9, 0.999))
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        use_amp = d.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    scaler = torch.amp.GradScaler(enabled=use_amp and dtype == torch.float16)

    step = 0
    done = checkpoint_dirs(run)
    if t.resume == "auto" and done:
        state = load_resume_state(done[-1], model, optimizer, scheduler, d, engine)
        step = state["step"]
        log.info("resumed from %s at step %d of %d", done[-1], step, total)
    pad_id = processor.tokenizer.pad_token_id
    collate_fn = collate_packed if t.packing else partial(collate, pad_id=pad_id, side="right")

    writer = SummaryWriter(str(run / "tensorboard"), purge_step=step + 1) if d.main else None
    bar = tqdm(total=total, initial=step, desc=run.parent.name, disable=not d.main, dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30)
    ckpt = done[-1] if done and step >= total else None
    net.train()
    while step < total:
        micro = step * t.grad_accum  # micro-batches consumed so far
        epoch, skip = divmod(micro, updates_per_epoch * t.grad_accum)
        indices = epoch_indices(len(dataset), t.seed, epoch, d, skip * t.batch_size, t.batch_size,
                                dataset.lengths() if t.group_by_length else None)
        loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, sampler=indices,
                                             num_workers=t.num_workers, collate_fn=collate_fn,
                                             pin_memory=d.device.type == "cuda")
        batches = iter(loader)
        while step < min(total, (epoch + 1) * updates_per_epoch):
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
                sync = k == t.grad_accum - 1 or not isinstance(net, torch.nn.parallel.DistributedDataParallel)
                if engine is not None:
                    loss = engine(**batch, use_cache=False).loss
                    engine.backward(loss)
                    engine.step()  # steps optimizer and scheduler only at the accumulation boundary
                else:
                    with (nullcontext() if sync else net.no_sync()), \
                            torch.autocast(d.device.type, dtype=dtype, enabled=use_amp):
                        loss = net(**batch, use_cache=False).loss
                        scaler.scale(loss / t.grad_accum).backward()
                losses.append(loss.item())
            if engine is not None:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            else:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm).item()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - tic
            loss_value, tok_s, samples_s, wait_fraction = mean_over_ranks(
                [sum(losses) / len(losses), tokens / seconds, samples / seconds, waited / seconds], d)
            tok_s, samples_s = tok_s * d.world_size, samples_s * d.world_size
            if writer and (step % t.log_every == 0 or step == total):
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/grad_norm", grad_norm, step)
                writer.add_scalar("train/tokens_per_s", tok_s, step)
                writer.add_scalar("train/samples_per_s", samples_s, step)
                writer.add_scalar("train/data_wait_fraction", wait_fraction, step)
                writer.add_scalar("train/pad_fraction", 1 - tokens / slots, step)
                writer.add_scalar("train/epoch", step / updates_per_epoch, step)
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                writer.add_scalar("train/lr", lrs.get("model", lrs.get("projector")), step)
                if "projector" in lrs and "model" in lrs:
                    writer.add_scalar("train/lr_projector", lrs["projector"], step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:.0f}")
            stop = any_rank(signals.requested(), d) and step < total
            if stop or step == total or (t.save_every and step % t.save_every == 0):
                ckpt = save_checkpoint(run, step, model, processor, kind, manifest, optimizer, scheduler,
                                       {"total": total}, d, engine)
            if stop:
                log.warning("stop requested: checkpoint saved at step %d of %d; exiting for requeue", step, total)
                if writer:
                    writer.close()
                raise SystemExit(signals.EXIT_REQUEUE)
    bar.close()
    if writer:
        writer.close()
    return ckpt if ckpt is not None else run / "checkpoints" / f"step-{total:06d}"
