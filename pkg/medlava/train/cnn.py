"""The CNN baseline's training (the `cnn` stage): a CnnTrainer, run by the one step loop (train/loop.py).

Two phases (backbone frozen for cnn.frozen_epochs, then its last layer groups fine-tuned at cnn.finetune_lr),
AdamW, mixed precision on GPUs, DDP under torchrun, early stopping on validation macro-F1, TensorBoard, a
checkpoint after every epoch (and at a stop request) that a re-run resumes from, and the best checkpoint's
predictions.csv for the test split in the VLM's contract, so `eval` and `compare` read both alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from medlava.config import CnnConfig
from medlava.data.samples import load_prepared, split_file
from medlava.distributed import Dist, barrier
from medlava.eval.classification import classification_metrics
from medlava.eval.plots import plot_history
from medlava.io import InputError, atomic_write_json, atomic_write_text, file_sha256
from medlava.models.cnn import (
    WEIGHTS,
    CnnClassifier,
    CnnSpec,
    Item,
    ItemDataset,
    MetaEncoder,
    eval_transform,
    keep_frozen_statistics,
    model_inputs,
    new_spec,
    predict_proba,
    set_phase,
    write_cnn,
)
from medlava.precision import autocast, autocast_dtype, choose_dtype, grad_scaler
from medlava.predictions import predictions_frame, write_predictions
from medlava.train import runtime
from medlava.train.checkpoint import Checkpointer
from medlava.train.loop import Position, Schedule, StepMetrics, resume_and_train
from medlava.train.optim import make_optimizer
from medlava.train.sampling import rank_share

log = logging.getLogger(__name__)
VAL_METRICS = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def sample_items(samples: list[dict], root: Path, classes: list[str], where: Path) -> list[Item]:
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for s in samples:
        meta = s.get("meta") or {}
        label = meta.get("label", meta.get("answer"))
        if label not in index:
            raise InputError(f"{where}: sample {s['id']} has label {label!r}, not one of {classes}; fix its meta.label")
        if not s.get("image"):
            raise InputError(f"{where}: sample {s['id']} has no image; the cnn stage classifies images")
        items.append(Item(str(s["id"]), root, s["image"], meta, index[label]))
    return items


def train_transform(spec: CnnSpec, augment: bool) -> v2.Compose:
    """Dermoscopy has no up or left, so any flip or rotation keeps the label; scale and colour vary with the
    camera and the light."""
    if not augment:
        return eval_transform(spec)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomRotation(180),
            v2.RandomResizedCrop(
                (spec.image_size, spec.image_size), scale=(0.6, 1.0), ratio=(0.85, 1.15), antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(0.2, 0.2, 0.2, 0.02),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, rank, epoch, position), stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class Augmented(torch.utils.data.Dataset):
    """Training items keyed by (index, seed): each draws its augmentation from its own seed, so a run resumed
    mid-epoch, with or without loader workers, draws exactly what the uninterrupted run would have."""

    def __init__(self, items: ItemDataset):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.items[index]


def epoch_order(labels: np.ndarray, balanced: bool, seed: int, epoch: int, dist: Dist) -> list[int]:
    """This rank's sample order for an epoch: a permutation, or class-balanced draws with replacement.
    By hand because DistributedSampler can neither draw balanced nor start mid-epoch (resume)."""
    g = torch.Generator().manual_seed(seed + epoch)
    if balanced:
        weights = torch.as_tensor(1.0 / np.bincount(labels)[labels])
        order = torch.multinomial(weights, len(labels), replacement=True, generator=g).tolist()
    else:
        order = torch.randperm(len(labels), generator=g).tolist()
    return rank_share(order, dist)


def class_weights(labels: np.ndarray, classes: list[str]) -> torch.Tensor:
    missing = [c for i, c in enumerate(classes) if i not in labels]
    if missing:
        raise InputError(
            f"cnn.class_balance=weights: class(es) {missing} have no training sample; "
            "use class_balance=none or add samples"
        )
    weights = compute_class_weight("balanced", classes=np.arange(len(classes)), y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def phase_plan(model: CnnClassifier, c: CnnConfig) -> list[dict]:
    """What each phase trains, at which rate, over which epochs (recorded in train_info.json)."""
    phases = []
    if c.frozen_epochs:
        phases.append(
            {
                "phase": 1,
                "epochs": [0, c.frozen_epochs],
                "lr": c.lr,
                **set_phase(model, frozen=True, unfreeze_fraction=c.unfreeze_fraction),
            }
        )
    phases.append(
        {
            "phase": 2,
            "epochs": [c.frozen_epochs, c.epochs],
            "lr": c.finetune_lr or c.lr,
            "unfreeze_fraction": c.unfreeze_fraction,
            **set_phase(model, frozen=False, unfreeze_fraction=c.unfreeze_fraction),
        }
    )
    return phases


def gather_proba(
    model: nn.Module, items: list[Item], spec: CnnSpec, c: CnnConfig, dist: Dist, amp: torch.dtype | None
) -> np.ndarray:
    """Probabilities for all `items` on every rank; each rank computes a 1/world share."""
    mine = list(range(dist.rank, len(items), dist.world_size))
    loader = DataLoader(
        Subset(ItemDataset(items, eval_transform(spec), spec.meta), mine),
        batch_size=c.batch_size,
        num_workers=c.num_workers,
        pin_memory=dist.device.type == "cuda",
    )
    probs = predict_proba(model, loader, dist.device, amp)
    if dist.world_size == 1:
        return probs
    parts: list = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, (mine, probs))
    out = np.zeros((len(items), len(spec.classes)))
    for idx, p in parts:
        if idx:
            out[idx] = p
    return out


def val_metrics(items: list[Item], probs: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    labels = np.array([it.label for it in items])
    df = pd.DataFrame(
        {
            "id": [it.id for it in items],
            "reference": [classes[i] for i in labels],
            "prediction": [classes[i] for i in probs.argmax(1)],
            **{f"score_{c}": probs[:, j] for j, c in enumerate(classes)},
        }
    )
    m = classification_metrics(df, classes, n_bootstrap=0)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"loss": loss, **{k: m[k] for k in VAL_METRICS[1:]}}


def load_splits(prepared: Path, c: CnnConfig) -> tuple[dict[str, list[Item]], list[str]]:
    """train, val and cnn.predict_split as labelled items, and the class list."""
    splits: dict[str, list[Item]] = {}
    for split in dict.fromkeys(("train", "val", c.predict_split)):
        samples, manifest = load_prepared(prepared, split)
        if not manifest.get("choices"):
            raise InputError(
                f"{prepared}/dataset.json lists no classes (`choices`): the cnn stage needs a "
                "classification dataset such as ham10000"
            )
        splits[split] = sample_items(
            samples, Path(manifest["image_root"]), manifest["choices"], prepared / f"{split}.jsonl"
        )
    if not splits["val"]:
        raise InputError(f"{prepared}/val.jsonl is empty: early stopping needs a validation split")
    return splits, list(manifest["choices"])


@dataclass
class Progress:
    """What the CNN carries from epoch to epoch besides the loop's position (and a checkpoint stores)."""

    best_f1: float = -1.0
    best: str | None = None
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


class CnnTrainer:
    """The CNN as a task of the step loop: phases, one optimizer per phase, validation at each epoch's end with
    early stopping and the best checkpoint kept."""

    def __init__(self, c: CnnConfig, dist: Dist, run: Path, prepared: Path, checkpointer: Checkpointer):
        """The data, the model, loss and precision, train_info.json."""
        self.c, self.dist, self.run, self.prepared, self.checkpointer = c, dist, run, prepared, checkpointer
        self.splits, self.classes = load_splits(prepared, c)
        torch.manual_seed(c.seed)  # the same initial weights on every rank and every run of a seed
        self.meta = MetaEncoder.fit([it.meta for it in self.splits["train"]]) if c.metadata else None
        self.spec = new_spec(c.arch, self.classes, c.image_size, c.head_hidden, c.dropout, self.meta)
        self.model = CnnClassifier(self.spec, c.pretrained)
        self.plan = phase_plan(self.model, c)
        self.model.to(dist.device)
        if dist.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.amp = autocast_dtype(choose_dtype(c.precision, without_bf16=torch.float16), dist.device)
        self.scaler = grad_scaler(self.amp)
        self.labels = np.array([it.label for it in self.splits["train"]])
        weight = class_weights(self.labels, self.classes).to(dist.device) if c.class_balance == "weights" else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=c.label_smoothing)
        self.steps_per_epoch = math.ceil(len(self.labels) / dist.world_size) // c.batch_size  # BatchNorm needs > 1
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{len(self.labels)} training samples over {dist.world_size} process(es) make no full "
                f"batch of cnn.batch_size={c.batch_size}; lower it"
            )
        if c.frozen_epochs and not c.pretrained:
            log.warning(
                "cnn.frozen_epochs=%d with a random backbone (no cnn.pretrained): phase 1 trains the head "
                "on random features",
                c.frozen_epochs,
            )
        self.progress = Progress()
        self.phase: int | None = None
        self.saved: dict | None = None  # a resumed checkpoint's optimizer state, until its phase is entered
        if dist.main:
            atomic_write_json(
                run / "train_info.json",
                {
                    "arch": c.arch,
                    "pretrained": c.pretrained,
                    "classes": self.classes,
                    "prepared": str(prepared),
                    "samples": {k: len(v) for k, v in self.splits.items()},
                    "world_size": dist.world_size,
                    "device": str(dist.device),
                    "autocast": str(self.amp).replace("torch.", "") if self.amp else "fp32",
                    "steps_per_epoch": self.steps_per_epoch,
                    "metadata": None if self.meta is None else asdict(self.meta),
                    "phases": self.plan,
                },
            )

    def restore(self, ckpt: Path, state: dict) -> Position:
        self.model.load_state_dict(load_file(str(ckpt / WEIGHTS)))
        self.saved, self.progress = state, Progress(**state["progress"])
        return Position(**state["position"])

    def enter_phase(self, epoch: int) -> None:
        """At a phase's first epoch (or a resume): what trains, its rate, its optimizer, its DDP wrapper."""
        c = self.c
        self.phase = 1 if epoch < c.frozen_epochs else 2
        p = next(x for x in self.plan if x["phase"] == self.phase)
        set_phase(self.model, frozen=self.phase == 1, unfreeze_fraction=c.unfreeze_fraction)
        self.optimizer = make_optimizer(self.model, p["lr"], c.weight_decay)
        self.scheduler = make_scheduler(
            self.optimizer, c.schedule, (p["epochs"][1] - p["epochs"][0]) * self.steps_per_epoch
        )
        if self.saved is not None and self.saved["phase"] == self.phase:  # resuming inside this phase
            self.optimizer.load_state_dict(self.saved["optimizer"])
            self.scheduler.load_state_dict(self.saved["scheduler"])
            self.scaler.load_state_dict(self.saved["scaler"])
        self.saved = None
        # DDP records which parameters train when it is built: one per phase
        self.net = runtime.wrap_ddp(self.model, self.dist)
        log.info(
            "phase %d from epoch %d: lr %g, %s of %s parameters train (%d of %d backbone groups)",
            self.phase,
            epoch,
            p["lr"],
            f"{p['parameters']['trainable']:,}",
            f"{p['parameters']['trainable'] + p['parameters']['frozen']:,}",
            p["trainable_groups"],
            p["backbone_groups"],
        )

    def batches(self, epoch: int, skip: int):
        c, dist = self.c, self.dist
        if self.phase != (1 if epoch < c.frozen_epochs else 2):
            self.enter_phase(epoch)
        self.net.train()
        keep_frozen_statistics(self.model)
        order = epoch_order(self.labels, c.class_balance == "sampler", c.seed, epoch, dist)
        keys = [(i, seed_of(c.seed, dist.rank, epoch, pos)) for pos, i in enumerate(order)][skip * c.batch_size :]
        return iter(
            DataLoader(
                Augmented(ItemDataset(self.splits["train"], train_transform(self.spec, c.augment), self.meta)),
                batch_size=c.batch_size,
                sampler=keys,
                num_workers=c.num_workers,
                drop_last=True,
                pin_memory=dist.device.type == "cuda",
            )
        )

    def step(self, batches, pos: Position) -> StepMetrics:
        c, dist = self.c, self.dist
        tic = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - tic
        torch.manual_seed(seed_of(c.seed, dist.rank, pos.epoch, pos.in_epoch, -1))  # dropout, the same after a resume
        with autocast(dist.device, self.amp):
            logits = self.net(**model_inputs(batch, dist.device))
        loss = self.loss_fn(logits.float(), batch["label"].to(dist.device))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return StepMetrics(
            loss=loss.item(),
            samples=len(batch["label"]),
            seconds=time.perf_counter() - tic,
            waited=waited,
            extra={"phase": float(self.phase)},
        )

    def lrs(self) -> dict[str, float]:
        return {"model": self.optimizer.param_groups[0]["lr"]}

    def save(self, pos: Position, name: str | None = None) -> Path:
        """epoch-E at an epoch's end (E epochs done), epoch-E-step-S inside epoch E; the best one stays."""
        name = name or f"epoch-{pos.epoch:03d}" + (f"-step-{pos.in_epoch:05d}" if pos.in_epoch else "")
        state = {
            "position": pos.state(),
            "progress": asdict(self.progress),
            "phase": self.phase,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

        def write(tmp: Path) -> None:
            if self.dist.main:
                write_cnn(tmp, self.model, self.spec)

        return self.checkpointer.save(
            name,
            "cnn",
            {"arch": self.spec.arch, "stage": "cnn", "classes": self.classes, "epoch": pos.epoch},
            state,
            write,
            keep=frozenset({self.progress.best} - {None}),
        )

    def end_epoch(self, pos: Position, losses: list[float], writer) -> Path:
        """Validation metrics, early stopping and the phase switch, the epoch's checkpoint, history and curves."""
        c, pr, epoch, phase = self.c, self.progress, pos.epoch, self.phase
        val = self.splits["val"]
        m = val_metrics(val, gather_proba(self.model, val, self.spec, c, self.dist, self.amp), self.classes)
        name = f"epoch-{epoch:03d}"
        if m["macro_f1"] > pr.best_f1:
            pr.best_f1, pr.best, pr.bad_epochs = m["macro_f1"], name, 0
        else:
            pr.bad_epochs += 1
        pr.history.append(
            {
                "epoch": epoch,
                "phase": phase,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": float(np.mean(losses)) if losses else None,
                **{f"val_{k}": v for k, v in m.items()},
            }
        )
        patience_out = c.patience is not None and pr.bad_epochs >= c.patience
        if phase == 1 and (patience_out or epoch == c.frozen_epochs):
            pos.epoch, pr.bad_epochs = c.frozen_epochs, 0  # on to phase 2, whose patience starts afresh
        elif patience_out or epoch >= c.epochs:
            pos.done = True
        ckpt = self.save(pos, name)
        if self.dist.main:
            for k, v in m.items():
                if v is not None:
                    writer.add_scalar(f"val/{k}", v, pos.step)
            atomic_write_text(self.run / "history.csv", pd.DataFrame(pr.history).to_csv(index=False))
            plot_history(pr.history, self.run / "curves.png")
        log.info(
            "epoch %d/%d (phase %d): train loss %.4f, val loss %.4f, accuracy %.4f, balanced accuracy %.4f, "
            "macro-F1 %.4f%s",
            epoch,
            c.epochs,
            phase,
            pr.history[-1]["train_loss"] or float("nan"),
            m["loss"],
            m["accuracy"],
            m["balanced_accuracy"],
            m["macro_f1"],
            " (best)" if pr.best == name else f" (best {pr.best_f1:.4f}, {pr.best})",
        )
        if patience_out:
            log.info("early stopping: %d epochs without a better validation macro-F1 in phase %d", c.patience, phase)
        return ckpt

    def predict(self) -> dict:
        """The best checkpoint answers cnn.predict_split into predictions.csv; what COMPLETE.json records."""
        pr = self.progress
        best = self.checkpointer.root / pr.best
        self.model.load_state_dict(load_file(str(best / WEIGHTS)))
        items = self.splits[self.c.predict_split]
        probs = gather_proba(self.model, items, self.spec, self.c, self.dist, self.amp)
        best_row = next(h for h in pr.history if f"epoch-{h['epoch']:03d}" == pr.best)
        if self.dist.main:
            write_predictions(self.run / "predictions.csv", predictions_frame(items, probs, self.classes))
            log.info(
                "cnn: best epoch %d (validation macro-F1 %.4f); %d %s predictions -> %s",
                best_row["epoch"],
                pr.best_f1,
                len(items),
                self.c.predict_split,
                self.run / "predictions.csv",
            )
        barrier()
        return {
            "checkpoint": str(best.relative_to(self.run)),
            "predictions": "predictions.csv",
            "classes": self.classes,
            "samples": str(self.prepared),
            "split": self.c.predict_split,
            "n": len(items),
            "epochs_run": len(pr.history),
            "best_epoch": best_row["epoch"],
            "best_val": {k: best_row[f"val_{k}"] for k in VAL_METRICS},
        }


def weight_settings(c: CnnConfig, prepared: Path) -> dict:
    """What decides the weights (runtime.weight_settings): the cnn section but the split it answers, and the digests
    of the training and validation splits (early stopping reads the latter)."""
    return runtime.weight_settings(
        "cnn",
        c,
        ("predict_split",),
        **{f"data.{split}": file_sha256(split_file(prepared, split)) for split in ("train", "val")},
    )


def run_cnn(c: CnnConfig, dist: Dist, run: Path, prepared: Path, settings: dict) -> dict:
    """Train on `prepared` into `run` (resuming what is there; checkpoints record `settings`), answer
    cnn.predict_split; the run's result."""
    checkpointer = Checkpointer(run, dist, c.keep_last, prefix="epoch", settings=settings)
    trainer = CnnTrainer(c, dist, run, prepared, checkpointer)
    lr = f"cnn.lr (now {c.lr:g})" + (f" or cnn.finetune_lr (now {c.finetune_lr:g})" if c.finetune_lr else "")
    resume_and_train(trainer, checkpointer, c.resume == "auto", c.seed, Schedule(None, None, 1, "cnn", lr), run, dist)
    return trainer.predict()
