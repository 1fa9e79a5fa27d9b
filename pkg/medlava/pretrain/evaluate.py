"""After training: the evaluation split's embeddings, retrieval recall@K, and zero-shot classification from class
prompts, written as predictions.csv (score_<class> columns) and metrics.json in the contracts `medlava eval`
and `medlava compare` read (their writers and metrics, with retrieval added to metrics.json)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch.utils.data import DataLoader, Subset

from medlava.distributed import Dist
from medlava.eval.closed import evaluate_closed
from medlava.io import atomic_write_json
from medlava.models.clip import ClipModule
from medlava.models.cnn import Item
from medlava.models.inputs import raise_batch_error
from medlava.predictions import predictions_frame, write_predictions
from medlava.pretrain.data import Pair, PairDataset, ZeroShot, collate
from medlava.pretrain.metrics import retrieval_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(
    model: ClipModule, dataset: PairDataset, batch_size: int, num_workers: int, dist: Dist, amp: torch.dtype | None
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised (image, caption) embeddings of every pair, on every rank; each rank computes a 1/world share."""
    model.eval()
    mine = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    images, texts = [], []
    for batch in loader:
        raise_batch_error(batch)
        with torch.autocast(dist.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            images.append(model.clip.encode_image(batch["image"].to(dist.device), normalize=True).float().cpu())
            texts.append(model.clip.encode_text(batch["text"].to(dist.device), normalize=True).float().cpu())
    part = (mine, torch.cat(images).numpy(), torch.cat(texts).numpy()) if mine else (mine, None, None)
    parts = [part]
    if dist.world_size > 1:
        parts = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, part)
    width = next(p[1].shape[1] for p in parts if p[0])
    out_i, out_t = np.zeros((len(dataset), width), np.float32), np.zeros((len(dataset), width), np.float32)
    for idx, im, tx in parts:
        if idx:
            out_i[idx], out_t[idx] = im, tx
    return out_i, out_t


def zero_shot_probabilities(model: ClipModule, images: np.ndarray, task: ZeroShot, device: torch.device) -> np.ndarray:
    """Class probabilities of each labelled pair: softmax of the scaled similarity to each class's mean prompt."""
    weights = (
        build_zero_shot_classifier(
            model.clip, model.tokenizer, task.names, task.templates, num_classes_per_batch=None, device=device
        )
        .float()
        .cpu()
        .numpy()
    )
    scale = float(model.clip.logit_scale.detach().exp())
    rows = [i for i, _ in task.labelled]
    return torch.softmax(torch.from_numpy(scale * images[rows] @ weights), 1).numpy()


def write_results(
    run: Path,
    model: ClipModule,
    pairs: list[Pair],
    dataset: PairDataset,
    task: ZeroShot | None,
    n_bootstrap: int,
    dist: Dist,
    amp: torch.dtype | None,
    batch_size: int,
    num_workers: int,
) -> dict:
    """Every rank embeds its share; rank 0 writes predictions.csv, the classification outputs and metrics.json."""
    images, texts = embed(model, dataset, batch_size, num_workers, dist, amp)
    if not dist.main:
        return {}
    metrics: dict = {"family": "retrieval"}
    if task is not None:
        probs = zero_shot_probabilities(model, images, task, dist.device)
        items = [Item(pairs[i].id, dataset.root, pairs[i].image, pairs[i].meta, c) for i, c in task.labelled]
        write_predictions(run / "predictions.csv", predictions_frame(items, probs, task.classes))
        metrics = evaluate_closed(run / "predictions.csv", run, task.classes, n_bootstrap)
        metrics["zero_shot"] = {
            "class_names": task.names,
            "templates": task.templates,
            "n": len(task.labelled),
            "chance_balanced_accuracy": 1 / len(task.classes),
        }
    metrics["retrieval"] = retrieval_metrics(images, texts, [p.caption for p in pairs])
    atomic_write_json(run / "metrics.json", metrics)
    return metrics
