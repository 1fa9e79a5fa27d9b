"""The `pretrain` stage: contrastive training of an open_clip model on image-caption pairs, then evaluation.

open_clip's ClipLoss with features gathered across ranks (gather_with_grad, local_loss), its grad checkpointing,
autocast precision, DDP, a cosine schedule with warm-up, TensorBoard, and the align/sft checkpoints and exact
resume (medlava.train.checkpoint: weights, optimizer, scheduler, RNG, data position). On SIGUSR2 every rank stops
at the same step, saves and exits 75 for requeue.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from transformers import get_cosine_schedule_with_warmup

from medlava import precision, signals
from medlava.config import Config, PretrainConfig
from medlava.data.samples import load_prepared
from medlava.distributed import Dist, barrier, mean_over_ranks
from medlava.io import InputError, atomic_write_json
from medlava.models.clip import ClipModule, TokenizerFiles, create, image_transform
from medlava.models.inputs import raise_batch_error
from medlava.pretrain.data import PairDataset, collate, pairs_of, zero_shot_task
from medlava.pretrain.evaluate import write_results
from medlava.pretrain.metrics import describe
from medlava.train import runtime
from medlava.train.checkpoint import load_resume_state, save_checkpoint
from medlava.train.optim import make_optimizer
from medlava.train.sampling import epoch_indices

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 100


def amp_dtype(p: PretrainConfig, d: Dist) -> torch.dtype | None:
    """pretrain.precision's autocast dtype (auto without bf16: fp16 with loss scaling); None on CPU."""
    return precision.autocast_dtype(precision.choose_dtype(p.precision, without_bf16=torch.float16), d.device)


def steps_per_epoch(n: int, p: PretrainConfig, d: Dist) -> int:
    """Full batches only: the contrastive task's difficulty depends on the batch size, so it never shrinks."""
    steps = math.ceil(n / d.world_size) // p.batch_size
    if steps == 0:
        raise InputError(f"{n} training pairs over {d.world_size} process(es) make no full batch of "
                         f"pretrain.batch_size={p.batch_size}; lower it")
    return steps


def contrastive_step(net: torch.nn.Module, model: ClipModule, batch: dict, loss_fn: ClipLoss, optimizer, scheduler,
                     scaler: torch.amp.GradScaler, p: PretrainConfig, d: Dist, amp: torch.dtype | None) -> tuple:
    """One optimizer step on a batch; (this rank's loss, gradient norm, logit scale)."""
    raise_batch_error(batch)
    with precision.autocast(d.device, amp):
        image_features, text_features, scale = net(batch["image"].to(d.device, non_blocking=True),
                                                   batch["text"].to(d.device, non_blocking=True))
        loss = loss_fn(image_features.float(), text_features.float(), scale.float())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm).item()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    with torch.no_grad():
        model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.item(), grad_norm, scale.item()


def train(model: ClipModule, dataset: PairDataset, p: PretrainConfig, run: Path, d: Dist, manifest: dict) -> Path:
    """Train and return the final checkpoint directory (every rank calls it)."""
    per_epoch = steps_per_epoch(len(dataset), p, d)
    total = p.max_steps or max(1, math.ceil(p.epochs * per_epoch))
    amp = amp_dtype(p, d)
    net = runtime.wrap_ddp(model, d)
    optimizer = make_optimizer(model, p.lr, p.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total * p.warmup_ratio), total)
    scaler = precision.grad_scaler(amp)
    loss_fn = ClipLoss(local_loss=p.local_loss, gather_with_grad=p.gather_with_grad, cache_labels=True,
                       rank=d.rank, world_size=d.world_size)
    step, done = 0, runtime.checkpoint_dirs(run, "step")
    if p.resume == "auto" and done:
        state = load_resume_state(done[-1], model, optimizer, scheduler, d)
        step = state["step"]
        scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s at step %d of %d", done[-1], step, total)
    ckpt = done[-1] if done and step >= total else None
    writer = runtime.tensorboard(run, step + 1, d)
    bar = runtime.progress(total, step, "pretrain", d)
    net.train()
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        order = epoch_indices(len(dataset), p.seed, epoch, d, skip * p.batch_size, p.batch_size)
        batches = iter(torch.utils.data.DataLoader(dataset, batch_size=p.batch_size, sampler=order, drop_last=True,
                                                   num_workers=p.num_workers, collate_fn=collate,
                                                   pin_memory=d.device.type == "cuda"))
        while step < min(total, (epoch + 1) * per_epoch):
            tic = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - tic  # > 0 when the loader cannot keep up (raise num_workers)
            loss, grad_norm, scale = contrastive_step(net, model, batch, loss_fn, optimizer, scheduler, scaler, p, d,
                                                      amp)
            step += 1
            seconds = time.perf_counter() - tic
            loss, samples_s, wait = mean_over_ranks([loss, p.batch_size / seconds, waited / seconds], d)
            if writer and (step % p.log_every == 0 or step == total):
                for tag, value in (("loss", loss), ("lr", optimizer.param_groups[0]["lr"]), ("grad_norm", grad_norm),
                                   ("logit_scale", scale), ("samples_per_s", samples_s * d.world_size),
                                   ("data_wait_fraction", wait), ("epoch", step / per_epoch)):
                    writer.add_scalar(f"train/{tag}", value, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            save, stop = runtime.save_or_stop(step, total, p.save_every, d)
            if save:
                ckpt = save_checkpoint(run, step, model, TokenizerFiles(model.tokenizer), "clip", manifest, optimizer,
                                       scheduler, {"total": total, "scaler": scaler.state_dict()}, d)
            if stop:
                runtime.exit_for_requeue(f"at step {step} of {total}", writer)
    bar.close()
    if writer:
        writer.close()
    return ckpt


def run_pretrain(cfg: Config, d: Dist, run: Path, prepared: Path) -> dict | None:
    """Train on the pairs of `prepared` into `run` (resuming what is there), then score pretrain.eval_split; the
    run's result on rank 0 (None on the others)."""
    p = cfg.pretrain
    signals.install()
    train_samples, manifest = load_prepared(prepared, "train")
    eval_samples, _ = load_prepared(prepared, p.eval_split)
    root = Path(manifest["image_root"])
    train_pairs = pairs_of(train_samples, prepared / "train.jsonl")
    eval_pairs = pairs_of(eval_samples, prepared / f"{p.eval_split}.jsonl")
    if not eval_pairs:
        raise InputError(f"{prepared}/{p.eval_split}.jsonl holds no image-text pairs to evaluate on; "
                         "set pretrain.eval_split to a split that has images")
    torch.manual_seed(p.seed)  # the same initial weights on every rank and every run of a seed
    model = create(p)
    if p.gradient_checkpointing:
        model.clip.set_grad_checkpointing(True)
    model.to(d.device)
    transform = image_transform(model.clip)
    task = zero_shot_task(eval_pairs, manifest.get("choices"), p.prompt_templates)
    info = {"model": p.model, "text_tower": p.text_tower, "prepared": str(prepared), "world_size": d.world_size,
            "device": str(d.device), "pairs": {"train": len(train_pairs), p.eval_split: len(eval_pairs)},
            "contrastive_batch": p.batch_size * d.world_size, "autocast": str(amp_dtype(p, d)),
            "parameters": sum(x.numel() for x in model.parameters()),
            "zero_shot_classes": task.classes if task else None}
    if d.main:
        atomic_write_json(run / "train_info.json", info)
    log.info("pretrain: %d training pairs, %s parameters, contrastive batch %d", len(train_pairs),
             f"{info['parameters']:,}", info["contrastive_batch"])
    ckpt = train(model, PairDataset(train_pairs, root, transform, model.tokenizer), p, run, d,
                 {"stage": "pretrain", "model": p.model})
    metrics = write_results(run, model, eval_pairs, PairDataset(eval_pairs, root, transform, model.tokenizer), task,
                            cfg.eval.n_bootstrap, d, amp_dtype(p, d), p.batch_size, p.num_workers)
    barrier()
    if not d.main:
        return None
    r = metrics["retrieval"]
    log.info("pretrain: %s%s -> %s", describe(r), f"; zero-shot balanced accuracy {metrics['balanced_accuracy']:.3f} "
             f"(chance {metrics['zero_shot']['chance_balanced_accuracy']:.3f})" if task else "", run)
    return {"checkpoint": str(ckpt.relative_to(run)), "samples": str(prepared), "split": p.eval_split,
            "predictions": "predictions.csv" if task else None, "classes": task.classes if task else None,
            "image_to_text": r["image_to_text"], "text_to_image": r["text_to_image"],
            "zero_shot_accuracy": metrics.get("accuracy")}
