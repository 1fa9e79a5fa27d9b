"""The `pretrain` stage: contrastive training of an open_clip model on image-caption pairs, then evaluation.

open_clip's ClipLoss with features gathered across ranks (gather_with_grad, local_loss), its grad checkpointing,
autocast precision, DDP and a cosine schedule with warm-up, as a task of medlava's one step loop (train/loop.py:
TensorBoard, checkpoints and exact resume, a stop at SIGUSR2 on every rank at the same step, exit 75 for requeue).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from medlava import precision, signals
from medlava.config import Config, PretrainConfig
from medlava.data.samples import load_prepared, split_file
from medlava.distributed import Dist, barrier
from medlava.io import InputError, atomic_write_json, file_sha256
from medlava.models.clip import WEIGHTS, ClipModule, TokenizerFiles, create, image_transform
from medlava.models.inputs import raise_batch_error
from medlava.pretrain.data import PairDataset, collate, pairs_of, zero_shot_task
from medlava.pretrain.evaluate import write_results
from medlava.pretrain.metrics import describe
from medlava.train import runtime
from medlava.train.checkpoint import Checkpointer
from medlava.train.loop import Position, Schedule, StepMetrics, resume_and_train
from medlava.train.optim import make_optimizer
from medlava.train.sampling import epoch_indices

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 100


def amp_dtype(p: PretrainConfig, dist: Dist) -> torch.dtype | None:
    """pretrain.precision's autocast dtype (auto without bf16: fp16 with loss scaling); None on CPU."""
    return precision.autocast_dtype(precision.choose_dtype(p.precision, without_bf16=torch.float16), dist.device)


def steps_per_epoch(n: int, p: PretrainConfig, dist: Dist) -> int:
    """Full batches only: the contrastive task's difficulty depends on the batch size, so it never shrinks."""
    steps = math.ceil(n / dist.world_size) // p.batch_size
    if steps == 0:
        raise InputError(
            f"{n} training pairs over {dist.world_size} process(es) make no full batch of "
            f"pretrain.batch_size={p.batch_size}; lower it"
        )
    return steps


class ClipTrainer:
    """Contrastive training of a ClipModule as a task of the step loop: one batch per step, full batches only."""

    def __init__(
        self,
        model: ClipModule,
        dataset: PairDataset,
        p: PretrainConfig,
        dist: Dist,
        manifest: dict,
        checkpointer: Checkpointer,
    ):
        self.model, self.dataset, self.p, self.dist = model, dataset, p, dist
        self.manifest, self.checkpointer = manifest, checkpointer
        self.steps_per_epoch = steps_per_epoch(len(dataset), p, dist)
        self.total = p.max_steps or max(1, math.ceil(p.epochs * self.steps_per_epoch))
        self.amp = amp_dtype(p, dist)
        self.net = runtime.wrap_ddp(model, dist)
        self.optimizer = make_optimizer(model, p.lr, p.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(self.total * p.warmup_ratio), self.total
        )
        self.scaler = precision.grad_scaler(self.amp)
        self.loss_fn = ClipLoss(
            local_loss=p.local_loss,
            gather_with_grad=p.gather_with_grad,
            cache_labels=True,
            rank=dist.rank,
            world_size=dist.world_size,
        )

    def batches(self, epoch: int, skip: int):
        p = self.p
        self.net.train()
        order = epoch_indices(len(self.dataset), p.seed, epoch, self.dist, skip * p.batch_size, p.batch_size)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_size=p.batch_size,
                sampler=order,
                drop_last=True,
                num_workers=p.num_workers,
                collate_fn=collate,
                pin_memory=self.dist.device.type == "cuda",
            )
        )

    def step(self, batches, pos: Position) -> StepMetrics:
        tic = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - tic
        raise_batch_error(batch)
        dist = self.dist
        with precision.autocast(dist.device, self.amp):
            image_features, text_features, scale = self.net(
                batch["image"].to(dist.device, non_blocking=True), batch["text"].to(dist.device, non_blocking=True)
            )
            loss = self.loss_fn(image_features.float(), text_features.float(), scale.float())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.p.max_grad_norm).item()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        with torch.no_grad():
            self.model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return StepMetrics(
            loss=loss.item(),
            samples=self.p.batch_size,
            seconds=time.perf_counter() - tic,
            waited=waited,
            grad_norm=grad_norm,
            extra={"logit_scale": scale.item()},
        )

    def lrs(self) -> dict[str, float]:
        return {"model": self.optimizer.param_groups[0]["lr"]}

    def end_epoch(self, pos: Position, losses: list[float], writer) -> None:
        return None

    def _write(self, tmp: Path) -> None:
        if self.dist.main:  # open_clip's local-dir layout: what model.vision_tower and resume read
            self.model.save_pretrained(tmp)
            TokenizerFiles(self.model.tokenizer).save_pretrained(tmp)

    def save(self, pos: Position) -> Path:
        state = {
            "position": pos.state(),
            "total": self.total,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        return self.checkpointer.save(
            f"step-{pos.step:06d}", "clip", {"step": pos.step, **self.manifest}, state, self._write
        )

    def restore(self, ckpt: Path, state: dict) -> Position:
        self.model.clip.load_state_dict(load_file(str(ckpt / WEIGHTS)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return Position(**state["position"])


def train(
    model: ClipModule, dataset: PairDataset, p: PretrainConfig, run: Path, dist: Dist, manifest: dict, settings: dict
) -> Path:
    """Train (resuming what `run` holds; checkpoints record `settings`) and return the final checkpoint directory
    (every rank calls it)."""
    checkpointer = Checkpointer(run, dist, p.keep_last, settings=settings)
    trainer = ClipTrainer(model, dataset, p, dist, manifest, checkpointer)
    return resume_and_train(
        trainer,
        checkpointer,
        p.resume == "auto",
        p.seed,
        Schedule(trainer.total, p.save_every, p.log_every, "pretrain", f"pretrain.lr (now {p.lr:g})"),
        run,
        dist,
    )


def weight_settings(cfg: Config, prepared: Path) -> dict:
    """What decides the weights (runtime.weight_settings): the pretrain section but what only evaluation reads, and
    the training split's digest."""
    return runtime.weight_settings(
        "pretrain",
        cfg.pretrain,
        ("eval_split", "prompt_templates"),
        **{"data.train": file_sha256(split_file(prepared, "train"))},
    )


def run_pretrain(cfg: Config, dist: Dist, run: Path, prepared: Path, settings: dict) -> dict | None:
    """Train on the pairs of `prepared` into `run` (resuming what is there; checkpoints record `settings`), then
    score pretrain.eval_split; the run's result on rank 0 (None on the others)."""
    p = cfg.pretrain
    signals.install()
    train_samples, manifest = load_prepared(prepared, "train")
    eval_samples, _ = load_prepared(prepared, p.eval_split)
    root = Path(manifest["image_root"])
    train_pairs = pairs_of(train_samples, prepared / "train.jsonl")
    eval_pairs = pairs_of(eval_samples, prepared / f"{p.eval_split}.jsonl")
    if not eval_pairs:
        raise InputError(
            f"{prepared}/{p.eval_split}.jsonl holds no image-text pairs to evaluate on; "
            "set pretrain.eval_split to a split that has images"
        )
    torch.manual_seed(p.seed)  # the same initial weights on every rank and every run of a seed
    model = create(p)
    if p.gradient_checkpointing:
        model.clip.set_grad_checkpointing(True)
    model.to(dist.device)
    transform = image_transform(model.clip)
    task = zero_shot_task(eval_pairs, manifest.get("choices"), p.prompt_templates)
    info = {
        "model": p.model,
        "text_tower": p.text_tower,
        "prepared": str(prepared),
        "world_size": dist.world_size,
        "device": str(dist.device),
        "pairs": {"train": len(train_pairs), p.eval_split: len(eval_pairs)},
        "contrastive_batch": p.batch_size * dist.world_size,
        "autocast": str(amp_dtype(p, dist)),
        "parameters": sum(x.numel() for x in model.parameters()),
        "zero_shot_classes": task.classes if task else None,
    }
    if dist.main:
        atomic_write_json(run / "train_info.json", info)
    log.info(
        "pretrain: %d training pairs, %s parameters, contrastive batch %d",
        len(train_pairs),
        f"{info['parameters']:,}",
        info["contrastive_batch"],
    )
    ckpt = train(
        model,
        PairDataset(train_pairs, root, transform, model.tokenizer),
        p,
        run,
        dist,
        {"stage": "pretrain", "model": p.model},
        settings,
    )
    metrics = write_results(
        run,
        model,
        eval_pairs,
        PairDataset(eval_pairs, root, transform, model.tokenizer),
        task,
        cfg.eval.n_bootstrap,
        dist,
        amp_dtype(p, dist),
        p.batch_size,
        p.num_workers,
    )
    barrier()
    if not dist.main:
        return None
    r = metrics["retrieval"]
    log.info(
        "pretrain: %s%s -> %s",
        describe(r),
        f"; zero-shot balanced accuracy {metrics['balanced_accuracy']:.3f} "
        f"(chance {metrics['zero_shot']['chance_balanced_accuracy']:.3f})"
        if task
        else "",
        run,
    )
    return {
        "checkpoint": str(ckpt.relative_to(run)),
        "samples": str(prepared),
        "split": p.eval_split,
        "predictions": "predictions.csv" if task else None,
        "classes": task.classes if task else None,
        "image_to_text": r["image_to_text"],
        "text_to_image": r["text_to_image"],
        "zero_shot_accuracy": metrics.get("accuracy"),
    }
