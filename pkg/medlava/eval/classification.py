"""Closed-question / label metrics from a predictions table (the predictions.csv contract).

Conventions:
- `prediction` must equal a class name exactly (mapping free text to classes is the normaliser's job);
  anything else, empty included, is "unmapped": counted wrong, counted and reported, never dropped.
- balanced_accuracy is the ISIC 2018 Task 3 metric: mean recall over the classes present in the
  references (what sklearn's balanced_accuracy_score does).
- macro_* / weighted_f1 average over the classes present in the references or the predictions
  (sklearn's default label set), with 0 for undefined precision/recall (zero_division=0).
- macro_auc is one-vs-rest from the `score_<class>` columns, averaged over the classes that have both
  positives and negatives; the others are listed in `auc_excluded_classes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from medlava.eval.bootstrap import percentile_ci, resample_counts
from medlava.io import InputError

SCORE_PREFIX = "score_"
UNMAPPED = "unmapped"
REQUIRED_COLUMNS = ("id", "prediction", "reference")
CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
_SUM_TOLERANCE = 1e-2  # scores written from fp16/bf16 softmax do not sum to 1 exactly


@dataclass(frozen=True)
class Encoded:
    """A validated predictions table as integer codes; code len(classes) marks an unmapped prediction."""

    classes: tuple[str, ...]
    ids: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray | None  # (n, n_classes) probabilities, or None when the table has no score columns

    @property
    def unmapped(self) -> np.ndarray:
        return self.y_pred == len(self.classes)


def score_classes(df: pd.DataFrame) -> list[str]:
    """Class names that have a `score_<class>` column, in column order."""
    return [str(c)[len(SCORE_PREFIX) :] for c in df.columns if str(c).startswith(SCORE_PREFIX)]


def _examples(ids: Any, limit: int = 5) -> str:
    ids = [str(i) for i in ids]
    return ", ".join(ids[:limit]) + (f" (and {len(ids) - limit} more)" if len(ids) > limit else "")


def encode(df: pd.DataFrame, classes: Sequence[str]) -> Encoded:
    """Validate `df` against the predictions contract and encode it; bad input raises InputError."""
    classes = tuple(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
        raise InputError(f"classes must be at least two distinct non-empty strings, got {list(classes)}")
    if UNMAPPED in classes:
        raise InputError(f"'{UNMAPPED}' is reserved for predictions outside the classes; rename that class")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"predictions missing required column(s) {missing}; have {list(df.columns)}")
    if df.empty:
        raise InputError("predictions table has no rows")
    ids = df["id"].astype(str).to_numpy()
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        raise InputError(
            f"duplicate id(s) in predictions (one row per sample expected): {_examples(np.unique(ids[dup]))}"
        )

    index = {c: i for i, c in enumerate(classes)}
    y_true = df["reference"].map(index)
    bad = y_true.isna().to_numpy()
    if bad.any():
        rows = [f"id={i} reference={r!r}" for i, r in zip(ids[bad], df["reference"].to_numpy()[bad])]
        raise InputError(f"reference not among classes {list(classes)}: {_examples(rows)}")
    y_pred = df["prediction"].map(index).fillna(len(classes))
    return Encoded(
        classes=classes,
        ids=ids,
        y_true=y_true.to_numpy(dtype=np.int64),
        y_pred=y_pred.to_numpy(dtype=np.int64),
        scores=_scores(df, classes, ids),
    )


def _scores(df: pd.DataFrame, classes: tuple[str, ...], ids: np.ndarray) -> np.ndarray | None:
    present = score_classes(df)
    if not present:
        return None
    extra = sorted(set(present) - set(classes))
    if extra:
        raise InputError(f"score columns for choices not among classes {list(classes)}: {extra}")
    absent = [c for c in classes if c not in present]
    if absent:
        raise InputError(
            f"score columns missing for class(es) {absent} while others have them; "
            f"need {SCORE_PREFIX}<class> for every class or for none"
        )
    cols = [SCORE_PREFIX + c for c in classes]
    scores = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(scores).all(axis=1) | (scores < 0).any(axis=1)
    if bad.any():
        raise InputError(f"score columns must be finite non-negative numbers; bad rows: id={_examples(ids[bad])}")
    off = np.abs(scores.sum(axis=1) - 1) > _SUM_TOLERANCE
    if off.any():
        raise InputError(
            f"scores must sum to 1 per row (probabilities over the classes); rows that do not: id={_examples(ids[off])}"
        )
    return scores


def confusion(df: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Counts: rows = reference class, columns = predicted class (+ `unmapped` when any prediction is)."""
    enc = encode(df, classes)
    k = len(enc.classes)
    cm = confusion_matrix(enc.y_true, enc.y_pred, labels=np.arange(k + 1))[:k]
    cols = [*enc.classes, UNMAPPED]
    if not enc.unmapped.any():
        cm, cols = cm[:, :k], cols[:k]
    return pd.DataFrame(cm, index=pd.Index(enc.classes, name="reference"), columns=pd.Index(cols, name="predicted"))


def _float(x: Any) -> float | None:
    """JSON-safe number: NaN (undefined) becomes null."""
    x = float(x)
    return x if np.isfinite(x) else None


def classification_metrics(
    df: pd.DataFrame, classes: Sequence[str], n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Point metrics with sklearn, per-class table, unmapped count, bootstrap 95% percentile intervals."""
    if n_bootstrap < 0:
        raise InputError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    enc = encode(df, classes)
    k = len(enc.classes)
    y_true, y_pred = enc.y_true, enc.y_pred
    in_ref = np.unique(y_true)
    seen = np.setdiff1d(np.union1d(y_true, y_pred), [k])  # sklearn's default labels, minus the unmapped code

    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=seen, average="macro", zero_division=0
    )
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=np.arange(k), zero_division=0)
    aucs, auc_reason = _class_aucs(enc)
    auc_ok = ~np.isnan(aucs)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "classes": list(enc.classes),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(recall_score(y_true, y_pred, labels=in_ref, average="macro", zero_division=0)),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=seen, average="weighted", zero_division=0)),
        "macro_auc": float(aucs[auc_ok].mean()) if auc_ok.any() else None,
        "auc_excluded_classes": [c for c, ok in zip(enc.classes, auc_ok) if not ok],
        "unmapped": int(enc.unmapped.sum()),
        "unmapped_rate": float(enc.unmapped.mean()),
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
                "auc": _float(aucs[i]),
            }
            for i, c in enumerate(enc.classes)
        },
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "ci95": _bootstrap_ci(enc, n_bootstrap, seed) if n_bootstrap else None,
    }
    if out["macro_auc"] is None:
        out["macro_auc_reason"] = auc_reason or "no class has both positive and negative references"
    return out


def _class_aucs(enc: Encoded) -> tuple[np.ndarray, str | None]:
    """One-vs-rest AUC per class (NaN where undefined) and, when there are no scores, why."""
    aucs = np.full(len(enc.classes), np.nan)
    if enc.scores is None:
        return aucs, f"no {SCORE_PREFIX}<class> columns in the predictions"
    for i in range(len(enc.classes)):
        positive = enc.y_true == i
        if 0 < positive.sum() < len(positive):
            aucs[i] = roc_auc_score(positive, enc.scores[:, i])
    return aucs, None


def _bootstrap_ci(enc: Encoded, n_bootstrap: int, seed: int) -> dict[str, list[float] | None]:
    """Percentile intervals over `n_bootstrap` row resamples, drawn in chunks to bound memory."""
    draws: dict[str, list[np.ndarray]] = {m: [] for m in CI_METRICS}
    for counts in resample_counts(len(enc.y_true), n_bootstrap, seed):
        for name, values in weighted_metrics(enc, counts).items():
            draws[name].append(values)
    return {name: percentile_ci(np.concatenate(parts)) for name, parts in draws.items()}


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(a)
    count = valid.sum(axis=1)
    return np.divide(np.where(valid, a, 0).sum(axis=1), count, out=np.full(len(a), np.nan), where=count > 0)


def weighted_metrics(enc: Encoded, w: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced_accuracy, macro_f1, macro_auc for each row of sample weights `w` (b, n).

    Hand-written because sklearn scores one weighting per call (~10 ms for all four), too slow for
    thousands of resamples; the definitions match the sklearn point estimates above (checked in tests).
    """
    k = len(enc.classes)
    correct = (enc.y_true == enc.y_pred).astype(float)
    truth = np.eye(k)[enc.y_true]
    predicted = np.zeros((len(enc.y_pred), k))
    predicted[~enc.unmapped, enc.y_pred[~enc.unmapped]] = 1
    support, n_pred, tp = w @ truth, w @ predicted, w @ (truth * correct[:, None])
    recall = np.divide(tp, support, out=np.full_like(tp, np.nan), where=support > 0)
    f1 = np.divide(2 * tp, support + n_pred, out=np.full_like(tp, np.nan), where=support + n_pred > 0)
    return {
        "accuracy": (w @ correct) / w.sum(axis=1),
        "balanced_accuracy": _nanmean_rows(recall),
        "macro_f1": _nanmean_rows(f1),
        "macro_auc": _nanmean_rows(_weighted_aucs(enc, w)),
    }


def _weighted_aucs(enc: Encoded, w: np.ndarray) -> np.ndarray:
    """(b, k) one-vs-rest AUCs as weighted Mann-Whitney statistics (ties count half); NaN if undefined."""
    aucs = np.full((len(w), len(enc.classes)), np.nan)
    if enc.scores is None:
        return aucs
    for i in range(len(enc.classes)):
        order = np.argsort(enc.scores[:, i], kind="stable")
        s = enc.scores[order, i]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # one group per distinct score
        positive = enc.y_true[order] == i
        ws = w[:, order]
        pos = np.add.reduceat(np.where(positive, ws, 0), starts, axis=1)
        neg = np.add.reduceat(np.where(positive, 0, ws), starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        aucs[:, i] = np.divide(wins, pairs, out=np.full(len(w), np.nan), where=pairs > 0)
    return aucs
