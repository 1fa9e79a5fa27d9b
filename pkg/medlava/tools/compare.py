"""`medlava compare`: classification results of several runs side by side (the seeds' results table), printed
and written as Markdown, CSV and a bar chart.

    medlava compare runs/ham10000-cnn/cnn/RUN runs/ham10000-llava-med-lora/eval/RUN --out results/
    medlava compare cnn=runs/tiny/cnn/t1 llava=runs/tiny/infer/t1

A RUN is an eval run (or its metrics.json), or anything with a predictions.csv (a cnn or infer run, or the CSV
itself), which is scored here in memory with the same metrics `eval` computes; nothing is written into it.
`LABEL=PATH` names a column; the default label is the path's <name>/<stage>/<run-id>.

Suite runs (directories holding leaderboard.csv, e.g. a zero-shot and a fine-tuned model) are lined up row by row
instead: each run's score with its interval, the difference to the first, the published scores.

    medlava compare zero-shot=runs/medvqa/suite/R1 fine-tuned=runs/medvqa/suite/R2 --out comparison/
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medlava.eval.classification import classification_metrics, score_classes
from medlava.eval.closed import CLASSIFICATION_TASKS, read_predictions
from medlava.io import InputError, atomic_savefig, atomic_write_text
from medlava.runs import is_complete, read_result

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
TITLES = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro-F1",
    "macro_auc": "Macro-AUC",
}


@dataclass(frozen=True)
class Result:
    label: str
    source: Path
    metrics: dict[str, Any]


def _label(path: Path) -> str:
    parts = path.resolve().parts
    if path.name in ("metrics.json", "predictions.csv"):
        parts = parts[:-1]
    return "/".join(parts[-3:])


def _from_predictions(csv: Path, classes: list[str] | None, n_bootstrap: int) -> dict[str, Any]:
    df = read_predictions(csv)
    if "task" in df.columns:
        df = df[df["task"].isin(CLASSIFICATION_TASKS)].reset_index(drop=True)
    if df.empty:
        raise InputError(f"{csv}: no closed/label rows to score")
    classes = classes or score_classes(df) or sorted(df["reference"].dropna().unique().tolist())
    try:
        return classification_metrics(df, classes, n_bootstrap=n_bootstrap)
    except InputError as e:
        raise InputError(f"{csv}: {e}") from None


def _split(arg: str) -> tuple[str, Path]:
    label, path = arg.split("=", 1) if "=" in arg and not Path(arg).exists() else ("", arg)
    return label or _label(Path(path)), Path(path)


def compare_suites(args: list[str], out: Path) -> int:
    """Suite runs' leaderboards side by side (comparison.md, .csv, .png in `out`)."""
    from medlava.eval.leaderboard import compare_leaderboards, comparison_markdown, plot_comparison

    runs = dict(_split(a) for a in args)
    missing = [str(p) for p in runs.values() if not (p / "leaderboard.csv").exists()]
    if missing:
        print(
            f"medlava compare: {', '.join(missing)} hold no leaderboard.csv: compare suite runs with suite runs",
            file=sys.stderr,
        )
        return 2
    df = compare_leaderboards({label: pd.read_csv(p / "leaderboard.csv") for label, p in runs.items()})
    text = comparison_markdown(df, list(runs))
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.csv", df.to_csv(index=False))
    plot_comparison(df, list(runs), out / "comparison.png")
    print(text + f"-> {out}/comparison.md, comparison.csv, comparison.png")
    return 0


def load_result(arg: str, n_bootstrap: int = 1000) -> Result:
    """`[LABEL=]PATH` -> its classification metrics (read from metrics.json, or computed from predictions)."""
    label, path = _split(arg)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: give an eval, cnn or infer run directory, a metrics.json or a predictions.csv"
        )
    metrics_json = path / "metrics.json" if path.is_dir() else path if path.suffix == ".json" else None
    if metrics_json is not None and metrics_json.exists():
        metrics = json.loads(metrics_json.read_text())
        if metrics.get("family", "classification") != "classification":
            raise InputError(
                f"{metrics_json}: {metrics['family']} metrics; compare lines up classification runs "
                "(accuracy, macro-F1, AUC)"
            )
        return Result(label, metrics_json, metrics)
    csv = path / "predictions.csv" if path.is_dir() else path
    if not csv.exists():
        raise FileNotFoundError(f"{path} holds neither metrics.json nor predictions.csv: is the run complete?")
    classes = read_result(csv.parent).get("classes") if is_complete(csv.parent) else None
    return Result(label, csv, _from_predictions(csv, classes, n_bootstrap))


def table(results: list[Result]) -> pd.DataFrame:
    rows = []
    for r in results:
        row: dict[str, Any] = {"run": r.label, "n": r.metrics.get("n")}
        ci = r.metrics.get("ci95") or {}
        for m in METRICS:
            row[m] = r.metrics.get(m)
            lo_hi = ci.get(m) or (None, None)
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo_hi
        row["source"] = str(r.source)
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(value: Any, low: Any, high: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and not pd.isna(low) else "")


def markdown(df: pd.DataFrame) -> str:
    head = ["Run", "n", *(TITLES[m] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in df.to_dict("records"):
        cells = [row["run"], str(row["n"]), *(_cell(row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) for m in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBrackets: bootstrap 95% intervals. Macro-AUC is one-vs-rest from the class scores.\n"


def comparison_figure(df: pd.DataFrame) -> Figure:
    """Grouped bars, one group per metric and one bar per run, each with its bootstrap 95% interval as an error
    bar and its value inside; the legend sits below the axes, where it covers nothing."""
    fig = Figure(figsize=(2.2 + 1.6 * len(METRICS), 3.2 + 0.25 * len(df)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(df)
    x = np.arange(len(METRICS))
    for i, row in enumerate(df.to_dict("records")):
        values = np.array([_number(row[m]) for m in METRICS])
        low = np.array([_number(row[f"{m}_ci_low"], v) for m, v in zip(METRICS, values)])
        high = np.array([_number(row[f"{m}_ci_high"], v) for m, v in zip(METRICS, values)])
        bars = ax.bar(
            x + (i - (len(df) - 1) / 2) * width,
            values,
            width,
            label=row["run"],
            yerr=[values - low, high - values],
            capsize=3,
            error_kw={"linewidth": 1},
        )
        ax.bar_label(bars, fmt="%.2f", label_type="center", fontsize=7, color="white")
    ax.set_xticks(x, [TITLES[m] for m in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score; whiskers: bootstrap 95% interval", fontsize=8)
    fig.legend(loc="outside lower center", ncols=min(len(df), 3), fontsize="small")
    return fig


def _number(value: Any, missing: float = 0.0) -> float:
    return missing if value is None or pd.isna(value) else float(value)


def plot(df: pd.DataFrame, path: Path) -> None:
    atomic_savefig(comparison_figure(df), path, dpi=150)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="medlava compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="eval/cnn/infer run, metrics.json or predictions.csv")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("comparison"),
        help="directory for comparison.md, comparison.csv and comparison.png (default: ./comparison)",
    )
    p.add_argument(
        "--n-bootstrap",
        type=int,
        default=1000,
        help="resamples for the intervals of runs scored here from predictions.csv (0: none)",
    )
    args = p.parse_args(argv)
    if any((_split(a)[1] / "leaderboard.csv").exists() for a in args.runs):
        return compare_suites(args.runs, args.out)
    try:
        results = [load_result(a, args.n_bootstrap) for a in args.runs]
    except (InputError, FileNotFoundError) as e:
        print(f"medlava compare: {e}", file=sys.stderr)
        return 2
    df = table(results)
    text = markdown(df)
    atomic_write_text(args.out / "comparison.md", text)
    atomic_write_text(args.out / "comparison.csv", df.to_csv(index=False))
    plot(df, args.out / "comparison.png")
    print(text + f"-> {args.out}/comparison.md, comparison.csv, comparison.png")
    return 0
