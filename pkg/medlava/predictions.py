"""predictions.csv, the contract between the stages that answer (infer, cnn, `medlava predict`) and the ones
that score (eval, compare): one row per sample with `id`, `prediction`, `reference` ("" when unknown), `task`,
one `score_<class>` column per choice when there are scores, and each scalar meta field as `meta_<key>`
(what eval splits by). This module is its only writer."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from medlava.io import atomic_write_text

# Meta fields that are the answer or the question's structure, not per-sample attributes to split by.
_NOT_META = {"task", "choices", "answer", "label"}


def scalar_meta(meta: dict) -> dict:
    return {
        k: v for k, v in meta.items() if k not in _NOT_META and (v is None or isinstance(v, (str, int, float, bool)))
    }


def answers_frame(rows: list[dict]) -> pd.DataFrame:
    """From infer's answers (LLaVA-Med answer-file rows), plus the prompt, the raw answer text and the image."""
    records = []
    for r in rows:
        md = r["metadata"]
        rec = {
            "id": r["question_id"],
            "prediction": md["prediction"],
            "reference": md["reference"],
            "task": md["task"],
            "prompt": r["prompt"],
            "text": r["text"],
            "image": md.get("image"),
        }
        rec.update({f"meta_{k}": v for k, v in (md.get("meta") or {}).items()})
        for choice, p in (md.get("scores") or {}).items():
            rec[f"score_{choice}"] = p
        records.append(rec)
    return pd.DataFrame.from_records(records)


def label_frame(
    ids: Sequence[str],
    images: Sequence[str],
    labels: Sequence[int],
    metas: Sequence[dict],
    probs: np.ndarray,
    classes: Sequence[str],
) -> pd.DataFrame:
    """From class probabilities (a CNN, or a VLM's option likelihoods); task `label`, plus the image; a
    label of -1 is an unknown reference."""
    rows = []
    for i, image, label, meta, p in zip(ids, images, labels, metas, probs, strict=True):
        row = {
            "id": i,
            "prediction": classes[int(np.argmax(p))],
            "reference": classes[label] if label >= 0 else "",
            "task": "label",
            "image": image,
        }
        row.update({f"score_{c}": float(v) for c, v in zip(classes, p, strict=True)})
        row.update({f"meta_{k}": v for k, v in scalar_meta(meta).items()})
        rows.append(row)
    return pd.DataFrame.from_records(rows)


class LabelledImage(Protocol):
    """An image to classify, as `medlava predict`, the CNN and zero-shot CLIP read them (models.cnn.Item)."""

    id: str
    rel: str
    label: int
    meta: dict


def predictions_frame(items: Sequence[LabelledImage], probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    return label_frame(
        [it.id for it in items],
        [it.rel for it in items],
        [it.label for it in items],
        [it.meta for it in items],
        probs,
        classes,
    )


def write_predictions(path: Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())
