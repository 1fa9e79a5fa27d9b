"""An eval run's TensorBoard view (seed 001's diagnostics): every metric as a scalar at the evaluated checkpoint's
step, accuracy per group (SLAKE's answer and content types, modality, MMMU's subjects, ...), the run's figures
(confusion matrix, ROC, per-group bars) as images, a grid of the worst samples' images with question, reference and
prediction (and the same as a text table), and histograms of the probabilities given to the options; for generated
reports, the worst ones by the most clinical per-report score computed, as a text table.

The scalars also go to the trained run's own `tensorboard/eval-<split>/` when the predictions came from one of its
checkpoints, so evaluating several checkpoints of a run draws a curve beside its training loss."""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from medlava.data.images import BadImage, load_image, resolve_image
from medlava.eval.classification import SCORE_PREFIX
from medlava.eval.plots import figure

log = logging.getLogger(__name__)

FIGURES = ("confusion.png", "roc.png", "vqa_groups.png")
GROUP_METRICS = (
    "accuracy",
    "closed_accuracy",
    "open_token_recall",
    "llava_med_closed_accuracy",
    "llava_med_open_recall",
    "mc_accuracy",
    "mmmu_accuracy",
)


SKIP = ("ci95", "radeval_ci95", "per_label", "conventions", "radeval_skipped", "seconds", "by_group")
"""metrics.json keys that are no scalars to plot (intervals, per-label tables, notes)."""
REPORT_RANKING = ("green", "radgraph_partial", "f1chexbert_sample_acc_all", "bertscore", "rougeL", "rouge_l")
"""Per-report columns to rank generated reports by, the first present wins."""


def _numbers(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in SKIP:
            continue
        if isinstance(value, dict):  # RadEval's own result keys, nested as it returns them
            out |= _numbers(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Every number of metrics.json as a tag: `eval/<name>` (nested keys joined with '/'), per-group accuracies as
    `eval_<group>/<value>/<metric>`."""
    out = _numbers(metrics, "eval")
    for key, groups in (metrics.get("by_group") or {}).items():
        for value, summary in groups.items():
            for m in GROUP_METRICS:
                if isinstance(summary.get(m), (int, float)):
                    out[f"eval_{key}/{value or '<empty>'}/{m}"] = float(summary[m])
    return out


def worst_reports(per_sample: pd.DataFrame, reports: pd.DataFrame, n: int = 20) -> tuple[str, str] | None:
    """(ranking column, a markdown table of the `n` lowest-scoring generated reports), None when nothing ranks them."""
    column = next((c for c in REPORT_RANKING if c in per_sample.columns and per_sample[c].notna().any()), None)
    if column is None or n <= 0:
        return None
    rows = per_sample[["id", column]].merge(reports[["id", "reference", "prediction"]], on="id")
    rows = rows.dropna(subset=[column]).sort_values([column, "id"], kind="stable").head(n)

    def cell(text: Any) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")[:400]

    lines = [f"| id | {column} | reference | generated |", "|---|---|---|---|"]
    lines += [
        f"| {cell(r.id)} | {getattr(r, column):.4f} | {cell(r.reference)} | {cell(r.prediction)} |"
        for r in rows.itertuples(index=False)
    ]
    return column, "\n".join(lines)


def worst_first(per: pd.DataFrame) -> pd.DataFrame:
    """The per-sample table ordered worst first: wrong (unparsed first) before right, open answers by token F1,
    classification by the probability given to the reference."""
    if "token_f1" in per.columns:
        from medlava.eval.vqa import error_rank

        return per.assign(_r=error_rank(per)).sort_values(["_r", "id"], kind="stable").drop(columns="_r")
    keys = [per["correct"].astype(bool)]
    if "reference_score" in per.columns:
        keys.append(per["reference_score"].astype(float))
    return (
        per.assign(_c=keys[0], _s=keys[-1] if len(keys) > 1 else 0.0)
        .sort_values(["_c", "_s", "id"], kind="stable")
        .drop(columns=["_c", "_s"])
    )


def _panel_text(row: pd.Series) -> str:
    lines = []
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        lines.append("Q: " + row["prompt"].split("\n")[0][:120])
    lines += [f"ref: {str(row.get('reference', ''))[:60]}", f"pred: {str(row.get('prediction', ''))[:60]}"]
    return "\n".join(textwrap.fill(x, 34, max_lines=3, placeholder=" ...") for x in lines)


def preview_grid(rows: pd.DataFrame, image_root: Path | None, n: int = 16) -> np.ndarray:
    """Up to `n` samples (in the given order) as a grid: image thumbnail over its question, reference and
    prediction; an RGB uint8 array."""
    rows = rows.head(n)
    cols = min(4, max(len(rows), 1))
    nrows = max(1, math.ceil(len(rows) / cols))
    fig = figure(3.0 * cols, 3.6 * nrows)
    for i, (_, row) in enumerate(rows.iterrows()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        ax.set_axis_off()
        image = None
        if image_root is not None and isinstance(row.get("image"), str) and row["image"]:
            try:
                image = load_image(resolve_image(image_root, row["image"]))
            except BadImage as e:  # a preview never fails the eval; the reason is in the log
                log.warning("preview of %s: %s", row.get("id"), e)
        if image is not None:
            image.thumbnail((224, 224))
            ax.imshow(np.asarray(image))
        ax.set_title(f"{row.get('id')}", fontsize=8)
        ax.text(0.0, -0.02, _panel_text(row), transform=ax.transAxes, fontsize=7, va="top", family="monospace")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def option_probabilities(predictions: pd.DataFrame) -> dict[str, np.ndarray]:
    """The probability the model gave to the reference option and to the option it picked, over rows with
    option scores."""
    cols = [c for c in predictions.columns if c.startswith(SCORE_PREFIX)]
    if not cols:
        return {}
    scores = predictions[cols].astype(float)
    has = scores.notna().any(axis=1) & predictions["reference"].notna()
    scores, refs = scores[has], predictions.loc[has, "reference"].astype(str)
    ref_p = [row.get(SCORE_PREFIX + r, np.nan) for r, (_, row) in zip(refs, scores.iterrows())]
    out = {"eval/p_predicted": scores.max(axis=1).to_numpy(), "eval/p_reference": np.asarray(ref_p, dtype=float)}
    return {k: v[np.isfinite(v)] for k, v in out.items() if np.isfinite(v).any()}


def markdown_table(rows: pd.DataFrame, n: int = 20) -> str:
    cols = [c for c in ("id", "prompt", "reference", "prediction", "text") if c in rows.columns]
    cell = lambda v: str(v).replace("|", "/").replace("\n", " ")[:100]  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for _, r in rows.head(n).iterrows()]
    return "\n".join(lines)


def write_eval_tensorboard(
    out_dir: Path,
    metrics: dict,
    predictions: pd.DataFrame,
    step: int,
    image_root: Path | None,
    curve_dir: Path | None = None,
) -> dict[str, int]:
    """Write the eval run's events into out_dir/tensorboard (and the scalars into `curve_dir`); return how many
    of each kind were written."""
    out_dir = Path(out_dir)
    values = scalars(metrics)
    counts = {"scalars": len(values), "images": 0, "histograms": 0, "text": 0}
    with SummaryWriter(str(out_dir / "tensorboard")) as w:
        for tag, v in values.items():
            w.add_scalar(tag, v, step)
        for name in FIGURES:
            if (out_dir / name).exists():
                w.add_image(
                    f"eval/{Path(name).stem}",
                    np.asarray(Image.open(out_dir / name).convert("RGB")),
                    step,
                    dataformats="HWC",
                )
                counts["images"] += 1
        per_path = out_dir / "per_sample.csv"
        if per_path.exists() and metrics.get("family") == "report":
            ranked = worst_reports(
                pd.read_csv(per_path, dtype={"id": str}), predictions.assign(id=predictions["id"].astype(str))
            )
            if ranked:
                w.add_text(f"eval/worst_reports_by_{ranked[0]}", ranked[1], step)
                counts["text"] += 1
        elif per_path.exists():
            per = pd.read_csv(
                per_path, dtype={"id": str, "reference": str, "prediction": str}, keep_default_na=False, na_values=[""]
            )
            if "image" in predictions.columns and "image" not in per.columns:
                images = predictions.assign(id=predictions["id"].astype(str)).set_index("id")["image"]
                per["image"] = per["id"].map(images)
            worst = worst_first(per)
            w.add_image("eval/worst_samples", preview_grid(worst, image_root), step, dataformats="HWC")
            w.add_text("eval/worst_samples", markdown_table(worst), step)
            counts["images"] += 1
            counts["text"] += 1
        for tag, v in option_probabilities(predictions).items():
            w.add_histogram(tag, v, step, bins=np.linspace(0, 1, 21))
            counts["histograms"] += 1
    if curve_dir is not None:
        try:
            with SummaryWriter(str(curve_dir)) as w:
                for tag, v in values.items():
                    w.add_scalar(tag, v, step)
        except OSError as e:
            log.warning("could not add the eval scalars to the trained run's TensorBoard (%s): %s", curve_dir, e)
    return counts
