"""Score a predictions.csv of closed questions / labels and write the metrics directory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlava.eval.classification import (
    REQUIRED_COLUMNS,
    classification_metrics,
    confusion,
    encode,
    score_classes,
)
from medlava.eval.plots import plot_confusion, plot_roc
from medlava.io import InputError, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CLASSIFICATION_TASKS = ("closed", "label")
_TEXT_COLUMNS = (*REQUIRED_COLUMNS, "task")
OUTPUTS = ("metrics.json", "per_sample.csv", "confusion.csv", "confusion.png", "roc.png")


def read_predictions(path: Path) -> pd.DataFrame:
    """predictions.csv with text columns kept as text: only an empty field is missing, so an answer
    such as "None" or "NA" stays a (wrong, unmapped) answer instead of turning into NaN."""
    try:
        return pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False, na_values=[""])
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable predictions CSV ({e})") from None


def evaluate_closed(
    predictions_csv: Path, out_dir: Path, classes: Sequence[str] | None = None, n_bootstrap: int = 1000
) -> dict[str, Any]:
    """Write metrics.json, per_sample.csv, confusion.csv, confusion.png and (with scores) roc.png.

    Rows whose `task` is not closed/label (e.g. open questions in the same file) are left to other
    scorers and counted in `excluded_rows`. `classes` defaults to the score columns' choices, else the
    sorted distinct references; pass it when a class may be missing from the references.
    """
    predictions_csv, out_dir = Path(predictions_csv), Path(out_dir)
    df = read_predictions(predictions_csv)
    excluded: dict[str, int] = {}
    if "task" in df.columns:
        keep = df["task"].isin(CLASSIFICATION_TASKS).to_numpy()
        excluded = {str(t): int(n) for t, n in df.loc[~keep, "task"].fillna("<empty>").value_counts().items()}
        df = df.loc[keep].reset_index(drop=True)
        if df.empty:
            raise InputError(f"{predictions_csv}: no rows with task in {list(CLASSIFICATION_TASKS)}; tasks: {excluded}")
    if classes is None:
        if "reference" not in df.columns:
            raise InputError(f"{predictions_csv}: missing required column 'reference'; have {list(df.columns)}")
        classes = score_classes(df) or sorted(df["reference"].dropna().unique().tolist())
    try:
        enc = encode(df, classes)
        metrics = classification_metrics(df, classes, n_bootstrap=n_bootstrap)
        cm = confusion(df, classes)
    except InputError as e:  # add the file to the message
        raise InputError(f"{predictions_csv}: {e}") from None
    metrics.update(family="classification", source=str(predictions_csv), excluded_rows=excluded)

    k = len(enc.classes)
    per_sample = pd.DataFrame(
        {
            "id": enc.ids,
            "reference": df["reference"],
            "prediction": df["prediction"],
            "correct": enc.y_true == enc.y_pred,
            "unmapped": enc.unmapped,
        }
    )
    if enc.scores is not None:
        per_sample["reference_score"] = enc.scores[np.arange(len(enc.ids)), enc.y_true]

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUTS:  # a re-run killed half-way must not leave an old metrics.json or roc.png behind
        (out_dir / stale).unlink(missing_ok=True)
    atomic_write_text(out_dir / "per_sample.csv", per_sample.to_csv(index=False))
    atomic_write_text(out_dir / "confusion.csv", cm.to_csv())
    plot_confusion(cm, out_dir / "confusion.png", title=f"Confusion matrix (n={metrics['n']}, {k} classes)")
    if enc.scores is not None:
        macro = metrics["macro_auc"]
        plot_roc(
            df,
            enc.classes,
            out_dir / "roc.png",
            title="One-vs-rest ROC" + (f" (macro AUC {macro:.3f})" if macro is not None else ""),
        )
    atomic_write_json(out_dir / "metrics.json", metrics)  # last: its presence marks a complete directory
    auc = "n/a" if metrics["macro_auc"] is None else f"{metrics['macro_auc']:.4f}"
    log.info(
        "%s: n=%d accuracy=%.4f balanced_accuracy=%.4f macro_f1=%.4f macro_auc=%s unmapped=%d",
        predictions_csv,
        metrics["n"],
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["macro_f1"],
        auc,
        metrics["unmapped"],
    )
    return metrics
