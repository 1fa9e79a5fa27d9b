"""What the figures show, read back from the matplotlib objects: every ROC class in its own panel with its own colour
and line style (even when several lie on one curve), the comparison's interval bars and a legend that covers no bar."""

import numpy as np
import pandas as pd
import pytest
from medlava.eval.plots import roc_figure
from medlava.tools.compare import Result, comparison_figure, table
from sklearn.metrics import roc_auc_score

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc", "absent"]


def predictions() -> pd.DataFrame:
    """Five classes scored perfectly (AUC 1.0: their curves coincide on one axes), two imperfectly, one absent."""
    rng = np.random.default_rng(0)
    refs = [c for c in CLASSES[:7] for _ in range(4)]
    scores = rng.uniform(0, 0.1, (len(refs), len(CLASSES)))
    for r, ref in enumerate(refs):
        scores[r, CLASSES.index(ref)] += 0.0 if ref in ("bkl", "mel") else 1.0  # those two: noise only
    scores /= scores.sum(1, keepdims=True)  # probabilities, as predictions.csv holds
    df = pd.DataFrame(scores, columns=[f"score_{c}" for c in CLASSES])
    df.insert(0, "id", [f"s{i}" for i in range(len(refs))])
    df.insert(1, "reference", refs)
    df.insert(2, "prediction", [CLASSES[i] for i in scores.argmax(1)])
    df.insert(3, "task", "closed")
    return df


def test_every_roc_class_has_its_own_panel_colour_and_style():
    df = predictions()
    fig = roc_figure(df, CLASSES, "ROC")
    panels = [ax for ax in fig.axes if ax.axison]
    curves = {ax.lines[1].get_label(): (ax, ax.lines[1]) for ax in panels}
    assert list(curves) == CLASSES[:7] and len(panels) == 7  # one panel per class present
    styles = {(line.get_color(), line.get_linestyle()) for _, line in curves.values()}
    assert len(styles) == 7 and len({c for c, _ in styles}) == 7  # distinct pairs and distinct colours
    assert all(ax.lines[0].get_linestyle() == ":" for ax in panels)  # the chance diagonal in each
    for cls, (ax, _) in curves.items():
        auc = roc_auc_score(df["reference"] == cls, df[f"score_{cls}"])
        n = int((df["reference"] == cls).sum())
        assert ax.get_title() == f"{cls}: AUC {auc:.3f}, n={n}"
    assert sum(ax.get_title().endswith("AUC 1.000, n=4") for ax in panels) == 5
    assert fig.get_suptitle() == "ROC; no curve (class absent): absent"


def result(label: str, shift: float) -> Result:
    metrics = {"n": 50, "ci95": {}}
    for i, m in enumerate(("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")):
        value = 0.6 + 0.1 * i - shift
        metrics[m] = value
        metrics["ci95"][m] = [value - 0.05 - 0.01 * i, min(value + 0.03, 1.0)]
    return Result(label, None, metrics)


def test_comparison_bars_carry_their_intervals_and_the_legend_covers_none():
    df = table([result("cnn", 0.0), result("llava-med lora", 0.2)])
    fig = comparison_figure(df)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    bars = [b for c in ax.containers for b in getattr(c, "patches", [])]
    errorbars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 8 and len(errorbars) == 2
    for (_, row), container in zip(df.iterrows(), errorbars):
        segments = container.lines[2][0].get_segments()
        for m, seg in zip(("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"), segments):
            assert [seg[0][1], seg[1][1]] == pytest.approx([row[f"{m}_ci_low"], row[f"{m}_ci_high"]])
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert [t.get_text() for t in legend.get_texts()] == ["cnn", "llava-med lora"]
    assert not box.overlaps(ax.get_window_extent(renderer))  # below the axes: no bar, whisker or label under it
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == sorted(
        f"{v:.2f}" for v in df[["accuracy", "balanced_accuracy", "macro_f1", "macro_auc"]].to_numpy().ravel()
    )
