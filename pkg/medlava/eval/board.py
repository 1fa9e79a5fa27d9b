"""An eval run in TensorBoard: every number of metrics.json as a scalar (nested keys joined with '/'), and for
reports the worst ones by the most clinical per-report score computed, as a text table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

RANKING = ("green", "radgraph_partial", "f1chexbert_sample_acc_all", "bertscore", "rougeL", "rouge_l")
"""Per-report columns to rank reports by, the first present wins."""
SKIP = ("ci95", "radeval_ci95", "per_label", "conventions", "radeval_skipped", "seconds")


def scalars(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in SKIP:
            continue
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out |= scalars(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def worst_reports(per_sample: pd.DataFrame, reports: pd.DataFrame, n: int) -> tuple[str, str] | None:
    """(ranking column, a markdown table of the `n` lowest-scoring reports), None when nothing ranks them."""
    column = next((c for c in RANKING if c in per_sample.columns and per_sample[c].notna().any()), None)
    if column is None or n <= 0:
        return None
    rows = per_sample[["id", column]].merge(reports[["id", "reference", "prediction"]], on="id")
    rows = rows.dropna(subset=[column]).sort_values([column, "id"], kind="stable").head(n)

    def cell(text: Any) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")[:400]

    lines = [f"| id | {column} | reference | generated |", "|---|---|---|---|"]
    lines += [f"| {cell(r.id)} | {getattr(r, column):.4f} | {cell(r.reference)} | {cell(r.prediction)} |"
              for r in rows.itertuples(index=False)]
    return column, "\n".join(lines)


def write_tensorboard(run: Path, metrics: dict[str, Any], reports: pd.DataFrame | None = None, n_worst: int = 20
                      ) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(run) / "tensorboard"
    with SummaryWriter(str(folder)) as writer:
        for name, value in scalars(metrics).items():
            writer.add_scalar(name, value, 0)
        per_sample = Path(run) / "per_sample.csv"
        if reports is not None and per_sample.exists():
            worst = worst_reports(pd.read_csv(per_sample, dtype={"id": str}), reports, n_worst)
            if worst:
                writer.add_text(f"eval/worst_reports_by_{worst[0]}", worst[1], 0)
    return folder
