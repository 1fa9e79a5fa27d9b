"""The CNN baseline's training (the `cnn` stage): setup / epoch / validate / predict over one CnnRun.

Two phases (backbone frozen for cnn.frozen_epochs, then its last layer groups fine-tuned at cnn.finetune_lr),
AdamW, mixed precision on GPUs, DDP under torchrun, early stopping on validation macro-F1, TensorBoard, a
checkpoint after every epoch (and at a stop request) that a re-run resumes from, and the best checkpoint's
predictions.csv for the test split in the VLM's contract, so `eval` and `compare` read both alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from medlava import signals
from medlava.config import CnnConfig
from medlava.data.samples import load_prepared
from medlava.distributed import Dist, barrier, mean_over_ranks
from medlava.eval.classification import classification_metrics
from medlava.io import InputError, atomic_savefig, atomic_write_json, atomic_write_text
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
    save_cnn,
    set_phase,
)
from medlava.precision import autocast, autocast_dtype, choose_dtype, grad_scaler
from medlava.predictions import predictions_frame, write_predictions
from medlava.train.optim import make_optimizer
from medlava.train.runtime import (
    STATE,
    checkpoint_dirs,
    exit_for_requeue,
    progress,
    stop_requested,
    tensorboard,
    wrap_ddp,
)
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
    return v2.Compose([
        v2.ToImage(), v2.RandomRotation(180),
        v2.RandomResizedCrop((spec.image_size, spec.image_size), scale=(0.6, 1.0), ratio=(0.85, 1.15), antialias=True),
        v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.ColorJitter(0.2, 0.2, 0.2, 0.02),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])


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


def epoch_order(labels: np.ndarray, balanced: bool, seed: int, epoch: int, d: Dist) -> list[int]:
    """This rank's sample order for an epoch: a permutation, or class-balanced draws with replacement.
    By hand because DistributedSampler can neither draw balanced nor start mid-epoch (resume)."""
    g = torch.Generator().manual_seed(seed + epoch)
    if balanced:
        weights = torch.as_tensor(1.0 / np.bincount(labels)[labels])
        order = torch.multinomial(weights, len(labels), replacement=True, generator=g).tolist()
    else:
        order = torch.randperm(len(labels), generator=g).tolist()
    return rank_share(order, d)


def class_weights(labels: np.ndarray, classes: list[str]) -> torch.Tensor:
    missing = [c for i, c in enumerate(classes) if i not in labels]
    if missing:
        raise InputError(f"cnn.class_balance=weights: class(es) {missing} have no training sample; "
                         "use class_balance=none or add samples")
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
        phases.append({"phase": 1, "epochs": [0, c.frozen_epochs], "lr": c.lr,
                       **set_phase(model, frozen=True, unfreeze_fraction=c.unfreeze_fraction)})
    phases.append({"phase": 2, "epochs": [c.frozen_epochs, c.epochs], "lr": c.finetune_lr or c.lr,
                   "unfreeze_fraction": c.unfreeze_fraction,
                   **set_phase(model, frozen=False, unfreeze_fraction=c.unfreeze_fraction)})
    return phases


def gather_proba(model: nn.Module, items: list[Item], spec: CnnSpec, c: CnnConfig, d: Dist,
                 amp: torch.dtype | None) -> np.ndarray:
    """Probabilities for all `items` on every rank; each rank computes a 1/world share."""
    mine = list(range(d.rank, len(items), d.world_size))
    loader = DataLoader(Subset(ItemDataset(items, eval_transform(spec), spec.meta), mine), batch_size=c.batch_size,
                        num_workers=c.num_workers, pin_memory=d.device.type == "cuda")
    probs = predict_proba(model, loader, d.device, amp)
    if d.world_size == 1:
        return probs
    parts: list = [None] * d.world_size
    dist.all_gather_object(parts, (mine, probs))
    out = np.zeros((len(items), len(spec.classes)))
    for idx, p in parts:
        if idx:
            out[idx] = p
    return out


def val_metrics(items: list[Item], probs: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    labels = np.array([it.label for it in items])
    df = pd.DataFrame({"id": [it.id for it in items], "reference": [classes[i] for i in labels],
                       "prediction": [classes[i] for i in probs.argmax(1)],
                       **{f"score_{c}": probs[:, j] for j, c in enumerate(classes)}})
    m = classification_metrics(df, classes, n_bootstrap=0)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"loss": loss, **{k: m[k] for k in VAL_METRICS[1:]}}


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a.legend()
    for key in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1"):
        b.plot(epochs, [h[key] for h in history], label=key[4:])
    b.set(xlabel="epoch", ylim=(0, 1), title="validation")
    b.legend(fontsize="small")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def load_splits(prepared: Path, c: CnnConfig) -> tuple[dict[str, list[Item]], list[str]]:
    """train, val and cnn.predict_split as labelled items, and the class list."""
    splits: dict[str, list[Item]] = {}
    for split in dict.fromkeys(("train", "val", c.predict_split)):
        samples, manifest = load_prepared(prepared, split)
        if not manifest.get("choices"):
            raise InputError(f"{prepared}/dataset.json lists no classes (`choices`): the cnn stage needs a "
                             "classification dataset such as ham10000")
        splits[split] = sample_items(samples, Path(manifest["image_root"]), manifest["choices"],
                                     prepared / f"{split}.jsonl")
    if not splits["val"]:
        raise InputError(f"{prepared}/val.jsonl is empty: early stopping needs a validation split")
    return splits, list(manifest["choices"])


@dataclass
class CnnRun:
    """Everything the CNN loop carries from step to step. `loop` is what a checkpoint stores to resume."""
    c: CnnConfig
    d: Dist
    run: Path
    prepared: Path
    splits: dict[str, list[Item]]
    classes: list[str]
    spec: CnnSpec
    model: CnnClassifier
    meta: MetaEncoder | None
    plan: list[dict]
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    labels: np.ndarray
    steps_per_epoch: int
    loop: dict = field(default_factory=lambda: {"epoch": 0, "step": 0, "best_f1": -1.0, "best": None,
                                                "bad_epochs": 0, "history": [], "done": False})
    saved: dict | None = None  # the resumed checkpoint's optimizer state, until its phase is entered
    writer: object = None
    phase: int | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    net: nn.Module | None = None


def setup(c: CnnConfig, d: Dist, run: Path, prepared: Path) -> CnnRun:
    """The data, the model, loss and precision, train_info.json, and a resumed state."""
    splits, classes = load_splits(prepared, c)
    torch.manual_seed(c.seed)  # the same initial weights on every rank and every run of a seed
    meta = MetaEncoder.fit([it.meta for it in splits["train"]]) if c.metadata else None
    spec = new_spec(c.arch, classes, c.image_size, c.head_hidden, c.dropout, meta)
    model = CnnClassifier(spec, c.pretrained)
    plan = phase_plan(model, c)
    model.to(d.device)
    if d.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(choose_dtype(c.precision, without_bf16=torch.float16), d.device)
    labels = np.array([it.label for it in splits["train"]])
    weight = class_weights(labels, classes).to(d.device) if c.class_balance == "weights" else None
    steps_per_epoch = math.ceil(len(labels) / d.world_size) // c.batch_size  # full batches: BatchNorm needs > 1
    if steps_per_epoch == 0:
        raise InputError(f"{len(labels)} training samples over {d.world_size} process(es) make no full batch of "
                         f"cnn.batch_size={c.batch_size}; lower it")
    if c.frozen_epochs and not c.pretrained:
        log.warning("cnn.frozen_epochs=%d with a random backbone (no cnn.pretrained): phase 1 trains the head on "
                    "random features", c.frozen_epochs)
    s = CnnRun(c, d, run, prepared, splits, classes, spec, model, meta, plan, amp, grad_scaler(amp),
               nn.CrossEntropyLoss(weight=weight, label_smoothing=c.label_smoothing), labels, steps_per_epoch)
    if d.main:
        atomic_write_json(run / "train_info.json", {
            "arch": c.arch, "pretrained": c.pretrained, "classes": classes, "prepared": str(prepared),
            "samples": {k: len(v) for k, v in splits.items()}, "world_size": d.world_size, "device": str(d.device),
            "autocast": str(amp).replace("torch.", "") if amp else "fp32", "steps_per_epoch": steps_per_epoch,
            "metadata": None if meta is None else asdict(meta), "phases": plan})
    done = checkpoint_dirs(run, "epoch")
    if c.resume == "auto" and done:
        model.load_state_dict(load_file(str(done[-1] / WEIGHTS)))
        s.saved = torch.load(done[-1] / STATE, map_location=d.device, weights_only=False)
        s.loop = s.saved["loop"]
        log.info("resumed from %s: epoch %d, step %d", done[-1], s.loop["epoch"], s.loop["step"])
    s.writer = tensorboard(run, s.loop["epoch"] * steps_per_epoch + s.loop["step"] + 1, d)
    return s


def save(s: CnnRun, name: str) -> None:
    """Rank 0 writes the checkpoint; only the best and the newest are kept."""
    if s.d.main:
        state = {"loop": s.loop, "phase": s.phase, "optimizer": s.optimizer.state_dict(),
                 "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict()}
        save_cnn(s.run / "checkpoints" / name, s.model, s.spec, {"stage": "cnn", "classes": s.classes,
                                                                  "epoch": s.loop["epoch"]}, {STATE: state})
        for old in checkpoint_dirs(s.run, "epoch"):
            if old.name not in {name, s.loop["best"]}:
                shutil.rmtree(old)
    barrier()


def enter_phase(s: CnnRun) -> None:
    """At a phase's first epoch (or a resume): what trains, its rate, its optimizer, its DDP wrapper."""
    c, epoch = s.c, s.loop["epoch"]
    s.phase = 1 if epoch < c.frozen_epochs else 2
    p = next(x for x in s.plan if x["phase"] == s.phase)
    set_phase(s.model, frozen=s.phase == 1, unfreeze_fraction=c.unfreeze_fraction)
    s.optimizer = make_optimizer(s.model, p["lr"], c.weight_decay)
    s.scheduler = make_scheduler(s.optimizer, c.schedule, (p["epochs"][1] - p["epochs"][0]) * s.steps_per_epoch)
    if s.saved is not None and s.saved["phase"] == s.phase:  # resuming inside this phase
        s.optimizer.load_state_dict(s.saved["optimizer"])
        s.scheduler.load_state_dict(s.saved["scheduler"])
        s.scaler.load_state_dict(s.saved["scaler"])
    s.saved = None
    s.net = wrap_ddp(s.model, s.d)  # DDP records which parameters train when it is built: one per phase
    log.info("phase %d from epoch %d: lr %g, %s of %s parameters train (%d of %d backbone groups)", s.phase,
             epoch, p["lr"], f"{p['parameters']['trainable']:,}",
             f"{p['parameters']['trainable'] + p['parameters']['frozen']:,}", p["trainable_groups"],
             p["backbone_groups"])


def train_epoch(s: CnnRun) -> list[float]:
    """The rest of the current epoch; the per-step losses (rank means). Exits for requeue on a stop request."""
    c, d, loop, epoch = s.c, s.d, s.loop, s.loop["epoch"]
    s.net.train()
    keep_frozen_statistics(s.model)
    order = epoch_order(s.labels, c.class_balance == "sampler", c.seed, epoch, d)
    keys = [(i, seed_of(c.seed, d.rank, epoch, pos)) for pos, i in enumerate(order)][loop["step"] * c.batch_size:]
    loader = DataLoader(Augmented(ItemDataset(s.splits["train"], train_transform(s.spec, c.augment), s.meta)),
                        batch_size=c.batch_size, sampler=keys, num_workers=c.num_workers, drop_last=True,
                        pin_memory=d.device.type == "cuda")
    bar = progress(s.steps_per_epoch, loop["step"], f"epoch {epoch + 1}/{c.epochs}", d)
    losses = []
    for batch in loader:
        tic = time.perf_counter()
        torch.manual_seed(seed_of(c.seed, d.rank, epoch, loop["step"], -1))  # dropout, the same after a resume
        with autocast(d.device, s.amp):
            logits = s.net(**model_inputs(batch, d.device))
        loss = s.loss_fn(logits.float(), batch["label"].to(d.device))
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        loop["step"] += 1
        losses.append(mean_over_ranks([loss.item()], d)[0])
        step = epoch * s.steps_per_epoch + loop["step"]
        if s.writer:
            s.writer.add_scalar("train/loss", losses[-1], step)
            s.writer.add_scalar("train/lr", s.optimizer.param_groups[0]["lr"], step)
            s.writer.add_scalar("train/images_per_s", len(batch["label"]) * d.world_size / (time.perf_counter() - tic),
                                step)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if loop["step"] < s.steps_per_epoch and stop_requested(d):
            save(s, f"epoch-{epoch:03d}-step-{loop['step']:05d}")
            exit_for_requeue(f"{loop['step']} steps into epoch {epoch + 1}")
    bar.close()
    return losses


def validate(s: CnnRun, losses: list[float]) -> None:
    """Validation metrics, early stopping and the phase switch, the epoch's checkpoint, history and curves."""
    c, loop, epoch, phase = s.c, s.loop, s.loop["epoch"], s.phase
    val = s.splits["val"]
    m = val_metrics(val, gather_proba(s.model, val, s.spec, c, s.d, s.amp), s.classes)
    name = f"epoch-{epoch + 1:03d}"
    if m["macro_f1"] > loop["best_f1"]:
        loop.update(best_f1=m["macro_f1"], best=name, bad_epochs=0)
    else:
        loop["bad_epochs"] += 1
    loop["history"].append({"epoch": epoch + 1, "phase": phase, "lr": s.optimizer.param_groups[0]["lr"],
                            "train_loss": float(np.mean(losses)) if losses else None,
                            **{f"val_{k}": v for k, v in m.items()}})
    loop.update(epoch=epoch + 1, step=0)
    patience_out = c.patience is not None and loop["bad_epochs"] >= c.patience
    if phase == 1 and (patience_out or loop["epoch"] == c.frozen_epochs):
        loop.update(epoch=c.frozen_epochs, bad_epochs=0)  # on to phase 2, whose patience starts afresh
    elif patience_out or loop["epoch"] >= c.epochs:
        loop["done"] = True
    save(s, name)
    if s.writer:
        for k, v in m.items():
            if v is not None:
                s.writer.add_scalar(f"val/{k}", v, (epoch + 1) * s.steps_per_epoch)
        s.writer.add_scalar("train/phase", phase, (epoch + 1) * s.steps_per_epoch)
    if s.d.main:
        atomic_write_text(s.run / "history.csv", pd.DataFrame(loop["history"]).to_csv(index=False))
        plot_history(loop["history"], s.run / "curves.png")
    log.info("epoch %d/%d (phase %d): train loss %.4f, val loss %.4f, accuracy %.4f, balanced accuracy %.4f, "
             "macro-F1 %.4f%s", epoch + 1, c.epochs, phase, loop["history"][-1]["train_loss"] or float("nan"),
             m["loss"], m["accuracy"], m["balanced_accuracy"], m["macro_f1"],
             " (best)" if loop["best"] == name else f" (best {loop['best_f1']:.4f}, {loop['best']})")
    if patience_out:
        log.info("early stopping: %d epochs without a better validation macro-F1 in phase %d", c.patience, phase)
    if not loop["done"] and stop_requested(s.d):
        exit_for_requeue(name)


def predict(s: CnnRun) -> dict:
    """The best checkpoint answers cnn.predict_split into predictions.csv; what COMPLETE.json records."""
    best = s.run / "checkpoints" / s.loop["best"]
    s.model.load_state_dict(load_file(str(best / WEIGHTS)))
    items = s.splits[s.c.predict_split]
    probs = gather_proba(s.model, items, s.spec, s.c, s.d, s.amp)
    best_row = next(h for h in s.loop["history"] if f"epoch-{h['epoch']:03d}" == s.loop["best"])
    if s.d.main:
        write_predictions(s.run / "predictions.csv", predictions_frame(items, probs, s.classes))
        log.info("cnn: best epoch %d (validation macro-F1 %.4f); %d %s predictions -> %s", best_row["epoch"],
                 s.loop["best_f1"], len(items), s.c.predict_split, s.run / "predictions.csv")
    barrier()
    return {"checkpoint": str(best.relative_to(s.run)), "predictions": "predictions.csv", "classes": s.classes,
            "samples": str(s.prepared), "split": s.c.predict_split, "n": len(items),
            "epochs_run": len(s.loop["history"]), "best_epoch": best_row["epoch"],
            "best_val": {k: best_row[f"val_{k}"] for k in VAL_METRICS}}


def run_cnn(c: CnnConfig, d: Dist, run: Path, prepared: Path) -> dict:
    """Train on `prepared` into `run` (resuming what is there), answer cnn.predict_split; the run's result."""
    signals.install()
    s = setup(c, d, run, prepared)
    while not s.loop["done"]:
        if s.phase != (1 if s.loop["epoch"] < s.c.frozen_epochs else 2):
            enter_phase(s)
        validate(s, train_epoch(s))
    if s.writer:
        s.writer.close()
    return predict(s)
