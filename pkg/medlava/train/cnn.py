"""The `cnn` stage: a CNN baseline on the prepared samples, in one plain loop.

Two phases (backbone frozen for cnn.frozen_epochs, then its last layer groups fine-tuned at cnn.finetune_lr),
AdamW, mixed precision on GPUs, DDP under torchrun, early stopping on validation macro-F1, TensorBoard, a
checkpoint after every epoch (and at a stop request) that a re-run resumes from, and the best checkpoint's
predictions.csv for the test split in the VLM's contract, so `eval` and `compare` read both alike.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms import v2
from tqdm import tqdm

from medlava import signals
from medlava.config import CnnConfig, Config
from medlava.data.samples import load_prepared
from medlava.distributed import Dist, any_rank, barrier, mean_over_ranks
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
from medlava.predict import predictions_frame
from medlava.runs import mark_complete, resolve, start_run

log = logging.getLogger(__name__)
STATE = "trainer_state.pt"
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


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 (always on CPU, where autocast only slows convolutions down)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def epoch_order(labels: np.ndarray, balanced: bool, seed: int, epoch: int, d: Dist) -> list[int]:
    """This rank's sample order for an epoch: a permutation, or class-balanced draws with replacement.
    By hand because DistributedSampler can neither draw balanced nor start mid-epoch (resume)."""
    g = torch.Generator().manual_seed(seed + epoch)
    if balanced:
        weights = torch.as_tensor(1.0 / np.bincount(labels)[labels])
        order = torch.multinomial(weights, len(labels), replacement=True, generator=g).tolist()
    else:
        order = torch.randperm(len(labels), generator=g).tolist()
    order += order[: (-len(order)) % d.world_size]  # equal shards, as DistributedSampler pads
    return order[d.rank :: d.world_size]


def class_weights(labels: np.ndarray, classes: list[str]) -> torch.Tensor:
    missing = [c for i, c in enumerate(classes) if i not in labels]
    if missing:
        raise InputError(f"cnn.class_balance=weights: class(es) {missing} have no training sample; "
                         "use class_balance=none or add samples")
    weights = compute_class_weight("balanced", classes=np.arange(len(classes)), y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over what trains now; biases and norms without weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


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


def checkpoint_dirs(run: Path) -> list[Path]:
    """epoch-E (after E epochs) and epoch-E-step-S (stopped S steps into the next), oldest first."""
    root = run / "checkpoints"
    found = [p for p in root.glob("epoch-*") if re.fullmatch(r"epoch-\d+(-step-\d+)?", p.name) and (p / STATE).exists()
             ] if root.exists() else []
    return sorted(found, key=lambda p: tuple(int(x) for x in p.name.split("-")[1::2]))


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


def run_cnn(cfg: Config, d: Dist) -> Path:
    c = cfg.cnn
    if c.pretrained and not Path(c.pretrained).is_file():
        raise FileNotFoundError(f"cnn.pretrained={c.pretrained} does not exist: download the timm weights of "
                                f"{c.arch} to that file, or set cnn.pretrained=null to start from random weights")
    signals.install()
    run = start_run(cfg, "cnn", d.rank, "always" if c.resume == "auto" else "never",
                    " (or cnn.resume=auto to continue it)")
    prepared = resolve(cfg, cfg.data.samples, "prepare")
    splits: dict[str, list[Item]] = {}
    for split in dict.fromkeys(("train", "val", c.predict_split)):
        samples, manifest = load_prepared(prepared, split)
        if not manifest.get("choices"):
            raise InputError(f"{prepared}/dataset.json lists no classes (`choices`): the cnn stage needs a "
                             "classification dataset such as ham10000")
        splits[split] = sample_items(samples, Path(manifest["image_root"]), manifest["choices"],
                                     prepared / f"{split}.jsonl")
    classes = list(manifest["choices"])
    train_items, val_items = splits["train"], splits["val"]
    if not val_items:
        raise InputError(f"{prepared}/val.jsonl is empty: early stopping needs a validation split")

    # -- model, loss, precision ------------------------------------------------------------------------------
    torch.manual_seed(c.seed)  # the same initial weights on every rank and every run of a seed
    meta = MetaEncoder.fit([it.meta for it in train_items]) if c.metadata else None
    spec = new_spec(c.arch, classes, c.image_size, c.head_hidden, c.dropout, meta)
    model = CnnClassifier(spec, c.pretrained)
    plan = phase_plan(model, c)
    model.to(d.device)
    if d.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    amp = amp_dtype(c.precision, d.device)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    labels = np.array([it.label for it in train_items])
    weight = class_weights(labels, classes).to(d.device) if c.class_balance == "weights" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=c.label_smoothing)
    steps_per_epoch = math.ceil(len(train_items) / d.world_size) // c.batch_size  # full batches: BatchNorm needs > 1
    if steps_per_epoch == 0:
        raise InputError(f"{len(train_items)} training samples over {d.world_size} process(es) make no full batch of "
                         f"cnn.batch_size={c.batch_size}; lower it")
    if c.frozen_epochs and not c.pretrained:
        log.warning("cnn.frozen_epochs=%d with a random backbone (no cnn.pretrained): phase 1 trains the head on "
                    "random features", c.frozen_epochs)
    info = {"arch": c.arch, "pretrained": c.pretrained, "classes": classes, "prepared": str(prepared),
            "samples": {s: len(v) for s, v in splits.items()}, "world_size": d.world_size, "device": str(d.device),
            "autocast": str(amp).replace("torch.", "") if amp else "fp32", "steps_per_epoch": steps_per_epoch,
            "metadata": None if meta is None else asdict(meta),
            "phases": plan}
    if d.main:
        atomic_write_json(run / "train_info.json", info)

    # -- resume ----------------------------------------------------------------------------------------------
    loop = {"epoch": 0, "step": 0, "best_f1": -1.0, "best": None, "bad_epochs": 0, "history": [], "done": False}
    saved = None
    done = checkpoint_dirs(run)
    if c.resume == "auto" and done:
        model.load_state_dict(load_file(str(done[-1] / WEIGHTS)))
        saved = torch.load(done[-1] / STATE, map_location=d.device, weights_only=False)
        loop = saved["loop"]
        log.info("resumed from %s: epoch %d, step %d", done[-1], loop["epoch"], loop["step"])
    writer = SummaryWriter(str(run / "tensorboard"), purge_step=loop["epoch"] * steps_per_epoch + loop["step"] + 1) \
        if d.main else None
    train_tf = train_transform(spec, c.augment)

    def save(name: str) -> None:
        """Rank 0 writes the checkpoint; only the best and the newest are kept."""
        if d.main:
            keep = {name, loop["best"]}
            state = {"loop": loop, "phase": phase, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
            save_cnn(run / "checkpoints" / name, model, spec, {"stage": "cnn", "classes": classes,
                                                               "epoch": loop["epoch"]}, {STATE: state})
            for old in checkpoint_dirs(run):
                if old.name not in keep:
                    shutil.rmtree(old)
        barrier()

    # -- train -----------------------------------------------------------------------------------------------
    phase = None
    while not loop["done"]:
        epoch = loop["epoch"]
        if phase != (1 if epoch < c.frozen_epochs else 2):  # a new phase: what trains, its rate, its optimizer
            phase = 1 if epoch < c.frozen_epochs else 2
            p = next(x for x in plan if x["phase"] == phase)
            set_phase(model, frozen=phase == 1, unfreeze_fraction=c.unfreeze_fraction)
            optimizer = make_optimizer(model, p["lr"], c.weight_decay)
            scheduler = make_scheduler(optimizer, c.schedule, (p["epochs"][1] - p["epochs"][0]) * steps_per_epoch)
            if saved is not None and saved["phase"] == phase:  # resuming inside this phase
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                scaler.load_state_dict(saved["scaler"])
            saved = None
            # DDP records which parameters train when it is built, so each phase gets its own wrapper.
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world_size > 1 else model
            log.info("phase %d from epoch %d: lr %g, %s of %s parameters train (%d of %d backbone groups)", phase,
                     epoch, p["lr"], f"{p['parameters']['trainable']:,}",
                     f"{p['parameters']['trainable'] + p['parameters']['frozen']:,}", p["trainable_groups"],
                     p["backbone_groups"])

        net.train()
        keep_frozen_statistics(model)
        order = epoch_order(labels, c.class_balance == "sampler", c.seed, epoch, d)
        keys = [(i, seed_of(c.seed, d.rank, epoch, pos)) for pos, i in enumerate(order)][loop["step"] * c.batch_size:]
        loader = DataLoader(Augmented(ItemDataset(train_items, train_tf, meta)), batch_size=c.batch_size,
                            sampler=keys, num_workers=c.num_workers, drop_last=True,
                            pin_memory=d.device.type == "cuda")
        bar = tqdm(total=steps_per_epoch, initial=loop["step"], desc=f"epoch {epoch + 1}/{c.epochs}",
                   disable=not d.main, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        losses = []
        for batch in loader:
            tic = time.perf_counter()
            torch.manual_seed(seed_of(c.seed, d.rank, epoch, loop["step"], -1))  # dropout, the same after a resume
            with torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = net(**model_inputs(batch, d.device))
            loss = loss_fn(logits.float(), batch["label"].to(d.device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loop["step"] += 1
            losses.append(mean_over_ranks([loss.item()], d)[0])
            step = epoch * steps_per_epoch + loop["step"]
            if writer:
                writer.add_scalar("train/loss", losses[-1], step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                images_per_s = len(batch["label"]) * d.world_size / (time.perf_counter() - tic)
                writer.add_scalar("train/images_per_s", images_per_s, step)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if loop["step"] < steps_per_epoch and any_rank(signals.requested(), d):
                save(f"epoch-{epoch:03d}-step-{loop['step']:05d}")
                log.warning("stop requested: checkpoint saved %d steps into epoch %d; exiting for requeue",
                            loop["step"], epoch + 1)
                raise SystemExit(signals.EXIT_REQUEUE)
        bar.close()

        # -- validate, early stopping, checkpoint ----------------------------------------------------------------
        m = val_metrics(val_items, gather_proba(model, val_items, spec, c, d, amp), classes)
        name = f"epoch-{epoch + 1:03d}"
        if m["macro_f1"] > loop["best_f1"]:
            loop.update(best_f1=m["macro_f1"], best=name, bad_epochs=0)
        else:
            loop["bad_epochs"] += 1
        loop["history"].append({"epoch": epoch + 1, "phase": phase, "lr": optimizer.param_groups[0]["lr"],
                                "train_loss": float(np.mean(losses)) if losses else None,
                                **{f"val_{k}": v for k, v in m.items()}})
        loop.update(epoch=epoch + 1, step=0)
        patience_out = c.patience is not None and loop["bad_epochs"] >= c.patience
        if phase == 1 and (patience_out or loop["epoch"] == c.frozen_epochs):
            loop.update(epoch=c.frozen_epochs, bad_epochs=0)  # on to phase 2, whose patience starts afresh
        elif patience_out or loop["epoch"] >= c.epochs:
            loop["done"] = True
        save(name)
        if writer:
            for k, v in m.items():
                if v is not None:
                    writer.add_scalar(f"val/{k}", v, (epoch + 1) * steps_per_epoch)
            writer.add_scalar("train/phase", phase, (epoch + 1) * steps_per_epoch)
        if d.main:
            atomic_write_text(run / "history.csv", pd.DataFrame(loop["history"]).to_csv(index=False))
            plot_history(loop["history"], run / "curves.png")
        log.info("epoch %d/%d (phase %d): train loss %.4f, val loss %.4f, accuracy %.4f, balanced accuracy %.4f, "
                 "macro-F1 %.4f%s", epoch + 1, c.epochs, phase, loop["history"][-1]["train_loss"] or float("nan"),
                 m["loss"], m["accuracy"], m["balanced_accuracy"], m["macro_f1"],
                 " (best)" if loop["best"] == name else f" (best {loop['best_f1']:.4f}, {loop['best']})")
        if patience_out:
            log.info("early stopping: %d epochs without a better validation macro-F1 in phase %d", c.patience, phase)
        if not loop["done"] and any_rank(signals.requested(), d):
            log.warning("stop requested: checkpoint %s saved; exiting for requeue", name)
            raise SystemExit(signals.EXIT_REQUEUE)
    if writer:
        writer.close()

    # -- predictions of the best checkpoint ------------------------------------------------------------------
    best = run / "checkpoints" / loop["best"]
    model.load_state_dict(load_file(str(best / WEIGHTS)))
    items = splits[c.predict_split]
    probs = gather_proba(model, items, spec, c, d, amp)
    if d.main:
        buf = io.StringIO()
        predictions_frame(items, probs, classes).to_csv(buf, index=False)
        atomic_write_text(run / "predictions.csv", buf.getvalue())
        best_row = next(h for h in loop["history"] if f"epoch-{h['epoch']:03d}" == loop["best"])
        mark_complete(run, {"checkpoint": str(best.relative_to(run)), "predictions": "predictions.csv",
                            "classes": classes, "samples": str(prepared), "split": c.predict_split, "n": len(items),
                            "epochs_run": len(loop["history"]), "best_epoch": best_row["epoch"],
                            "best_val": {k: best_row[f"val_{k}"] for k in VAL_METRICS}})
        log.info("cnn: best epoch %d (validation macro-F1 %.4f); %d %s predictions -> %s", best_row["epoch"],
                 loop["best_f1"], len(items), c.predict_split, run / "predictions.csv")
    barrier()
    return run
