"""Confusion-matrix and ROC figures for closed-question results, and a training run's per-epoch curves.

Figures are built with matplotlib's object API on an Agg canvas, not pyplot: no display is needed
and no figure is registered globally, so nothing stays open after a save (or after an exception).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from medlava.eval.classification import SCORE_PREFIX, encode
from medlava.io import InputError, atomic_savefig


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(
    cm: pd.DataFrame, path: str | os.PathLike, title: str = "Confusion matrix", normalize: bool = True
) -> Path:
    """Heatmap of `cm` (rows = reference, columns = predicted) with counts written in each cell.

    With `normalize`, colours are row fractions (per-class recall on the diagonal), so rare classes
    stay readable next to a dominant one; cells then also show the row percentage.
    """
    counts = cm.to_numpy()
    rows = counts.sum(axis=1, keepdims=True)
    shade = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0) if normalize else counts
    size = 1.5 + 0.6 * max(counts.shape)
    fig = figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(shade, cmap="Blues", vmin=0, vmax=1 if normalize else max(int(counts.max()), 1))
    fig.colorbar(image, ax=ax, label="fraction of reference row" if normalize else "count")
    fontsize = max(6, 11 - counts.shape[1] // 2)
    for r, c in np.ndindex(counts.shape):
        text = f"{counts[r, c]}\n{shade[r, c]:.0%}" if normalize else f"{counts[r, c]}"
        dark = shade[r, c] > (0.5 if normalize else counts.max() / 2)
        ax.text(c, r, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    ax.set_xticks(range(counts.shape[1]), [str(c) for c in cm.columns], rotation=45, ha="right")
    ax.set_yticks(range(counts.shape[0]), [str(i) for i in cm.index])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    return atomic_savefig(fig, path, dpi=150)


LINE_STYLES = ("-", "--", "-.", ":")


def class_style(i: int) -> dict[str, str]:
    """Class i's colour and line style: both differ between neighbours, and the pair is unique for 20 classes."""
    return {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i % len(LINE_STYLES)]}


def roc_figure(df: pd.DataFrame, classes: Sequence[str], title: str = "One-vs-rest ROC") -> Figure:
    """Small multiples: one panel per class with its one-vs-rest curve (its score column against the rest) over
    the chance diagonal, AUC and support in the panel's title. Curves of the same shape (several classes at
    AUC 1.0) would hide each other on one axes; here each has its own, in its own colour and line style."""
    enc = encode(df, classes)
    if enc.scores is None:
        raise InputError(f"ROC needs {SCORE_PREFIX}<class> columns; the predictions have none")
    curves, skipped = [], []
    for i, cls in enumerate(enc.classes):
        positive = enc.y_true == i
        if not 0 < positive.sum() < len(positive):
            skipped.append(cls)  # no positives (or no negatives): the curve is undefined
            continue
        fpr, tpr, _ = roc_curve(positive, enc.scores[:, i])
        curves.append((i, cls, fpr, tpr, int(positive.sum())))
    cols = min(4, max(len(curves), 1))
    rows = max(1, -(-len(curves) // cols))
    fig = figure(0.4 + 2.3 * cols, 0.9 + 2.3 * rows)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (i, cls, fpr, tpr, n) in zip(axes, curves):
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
        ax.plot(fpr, tpr, linewidth=2, label=cls, **class_style(i))
        ax.set_title(f"{cls}: AUC {auc(fpr, tpr):.3f}, n={n}", fontsize=9)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
        ax.set_yticks([0, 0.5, 1], ["0", "0.5", "1"])
        ax.set_aspect("equal")
    for k, ax in enumerate(axes[len(curves) :], len(curves)):
        ax.axis("off")
        axes[k - cols].xaxis.set_tick_params(labelbottom=True)  # the panel above ends its column
    fig.suptitle(title + (f"; no curve (class absent): {', '.join(skipped)}" if skipped else ""), fontsize=10)
    fig.supxlabel("false positive rate (dotted: chance)", fontsize=9)
    fig.supylabel("true positive rate", fontsize=9)
    return fig


def plot_roc(df: pd.DataFrame, classes: Sequence[str], path: str | os.PathLike, title: str = "One-vs-rest ROC") -> Path:
    return atomic_savefig(roc_figure(df, classes, title), path, dpi=150)


def plot_bars(values: dict[str, float | None], path: str | os.PathLike, title: str, xlabel: str) -> Path:
    """Horizontal bars, one per named value in [0, 1] (per-group accuracy, per-label F1); None shows as n/a."""
    names = list(values)
    fig = figure(7.0, 1.2 + 0.32 * max(len(names), 1))
    ax = fig.add_subplot()
    heights = [v if v is not None else 0.0 for v in values.values()]
    ax.barh(range(len(names)), heights, color="#4c72b0")
    for i, v in enumerate(values.values()):
        ax.text(min(v or 0.0, 0.92) + 0.01, i, "n/a" if v is None else f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    return atomic_savefig(fig, path, dpi=150)


def plot_history(history: list[dict], path: Path) -> None:
    """A training run's per-epoch curves (history.csv's rows): train and validation loss, validation metrics."""
    fig = Figure(figsize=(9, 3.2))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
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
