"""The suite's leaderboard: one row per benchmark split its published protocol reports (closed/open for LLaVA-Med's
three, all questions for multiple choice, MMMU overall and per subject), the run's score with a bootstrap 95%
interval (resampled over that row's questions), and the published scores measured the same way beside it, with
their sources (published_vqa.yaml). Written as leaderboard.csv, leaderboard.md and leaderboard.png; `medlava compare`
lines up several of them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from medlava.eval.bootstrap import mean_ci
from medlava.eval.plots import figure
from medlava.io import InputError, atomic_savefig, atomic_write_text

DIGITS = 2


@dataclass(frozen=True)
class Row:
    row: str
    metric: str
    """The metrics.json key the score is (the published tables' number)."""
    column: str
    """The per_sample.csv column whose mean over the row's questions it is."""
    task: str | None = None
    """Only questions of this task (None: every question scored by the metric)."""


LLAVA_MED = (
    Row("closed", "llava_med_closed_accuracy", "llava_med_closed_hit", "closed"),
    Row("open", "llava_med_open_recall", "llava_med_open_recall", "open"),
)
MULTIPLE_CHOICE = (Row("all", "mc_accuracy", "correct", "multiple_choice"),)
PROTOCOLS = {
    "vqa_rad": LLAVA_MED,
    "slake": LLAVA_MED,
    "path_vqa": LLAVA_MED,
    "pmc_vqa": MULTIPLE_CHOICE,
    "omnimedvqa": MULTIPLE_CHOICE,
    "medxpertqa": MULTIPLE_CHOICE,
    "mmmu_med": (Row("all", "mmmu_accuracy", "mmmu_correct"),),
}
"""Each benchmark's published protocol: LLaVA-Med's run_eval_batch.py for its three, letter accuracy for the
multiple-choice ones, MMMU's evaluate for MMMU (also per subject, as its tables report)."""
PER_SUBJECT = {"mmmu_med": "subject"}
NAMES = {
    "vqa_rad": "VQA-RAD",
    "slake": "SLAKE",
    "path_vqa": "PathVQA",
    "pmc_vqa": "PMC-VQA",
    "omnimedvqa": "OmniMedVQA",
    "medxpertqa": "MedXpertQA MM",
    "mmmu_med": "MMMU Health & Medicine",
}


def published() -> tuple[dict[str, str], pd.DataFrame]:
    data = yaml.safe_load(resources.files("medlava.eval").joinpath("published_vqa.yaml").read_text())
    return data["sources"], pd.DataFrame(data["scores"])


def bootstrap_ci(values: np.ndarray, n_bootstrap: int, seed: int = 0) -> tuple[float, float] | tuple[None, None]:
    """Percentile 95% interval of the mean over `n_bootstrap` resamples of the questions (none for fewer than 2)."""
    ci = mean_ci(values, n_bootstrap, seed) if len(values) >= 2 else None
    return (ci[0], ci[1]) if ci else (None, None)


def benchmark_rows(bench: str, dataset: str, per_sample: Path, n_bootstrap: int, seed: int = 0) -> list[dict]:
    """The leaderboard rows of one benchmark from its eval's per_sample.csv, scores in percent."""
    if dataset not in PROTOCOLS:
        raise InputError(f"no published protocol for {dataset}; the suite scores {', '.join(PROTOCOLS)}")
    per = pd.read_csv(per_sample, dtype={"id": str}, keep_default_na=False, na_values=[""])
    rows = []
    for spec in PROTOCOLS[dataset]:
        part = per if spec.task is None else per[per["task"] == spec.task]
        part = part[part[spec.column].notna()]
        rows += [_row(bench, dataset, spec.row, spec.metric, part[spec.column], n_bootstrap, seed)]
        if dataset in PER_SUBJECT and PER_SUBJECT[dataset] in part.columns:
            for value, sub in part.groupby(PER_SUBJECT[dataset], sort=True):
                rows.append(_row(bench, dataset, str(value), spec.metric, sub[spec.column], n_bootstrap, seed))
    return [r for r in rows if r["n"]]


def _row(bench: str, dataset: str, row: str, metric: str, values: pd.Series, n_bootstrap: int, seed: int) -> dict:
    v = values.map(lambda x: float(x in (True, "True", "true")) if isinstance(x, (bool, str)) else float(x))
    v = v.to_numpy(float)
    lo, hi = bootstrap_ci(v, n_bootstrap, seed)
    pct = lambda x: None if x is None else round(100 * x, DIGITS)  # noqa: E731
    return {
        "benchmark": bench,
        "dataset": dataset,
        "row": row,
        "metric": metric,
        "n": len(v),
        "score": pct(float(v.mean())) if len(v) else None,
        "ci_low": pct(lo),
        "ci_high": pct(hi),
    }


def leaderboard(rows: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """The table with one column per published model (its score where the metric matches), and the sources used."""
    _, scores = published()
    df = pd.DataFrame(rows)
    used: set[str] = set()
    for model in dict.fromkeys(scores["model"]):
        mine = scores[scores["model"] == model]
        key = dict(zip(zip(mine["benchmark"], mine["row"], mine["metric"]), zip(mine["score"], mine["source"])))
        hits = [key.get((d, r, m)) for d, r, m in zip(df["dataset"], df["row"], df["metric"])]
        if any(hits):
            df[model] = [h[0] if h else None for h in hits]
            used.update(h[1] for h in hits if h)
    return df, sorted(used)


def _cell(score, lo, hi) -> str:
    if score is None or pd.isna(score):
        return "n/a"
    return f"{score:.{DIGITS}f}" + (
        f" [{lo:.{DIGITS}f}, {hi:.{DIGITS}f}]" if lo is not None and not pd.isna(lo) else ""
    )


def markdown(df: pd.DataFrame, used: list[str], title: str) -> str:
    sources, scores = published()
    models = [
        c for c in df.columns if c not in ("benchmark", "dataset", "row", "metric", "n", "score", "ci_low", "ci_high")
    ]
    head = ["Benchmark", "Split", "Metric", "n", "This run [95% CI]", *models]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r in df.to_dict("records"):
        cells = [
            NAMES.get(r["dataset"], r["benchmark"])
            + ("" if r["benchmark"] == r["dataset"] else f" ({r['benchmark']})"),
            r["row"],
            r["metric"],
            str(r["n"]),
            _cell(r["score"], r["ci_low"], r["ci_high"]),
            *(f"{r[m]:.{DIGITS}f}" if not pd.isna(r[m]) else "" for m in models),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    shown = set(zip(df["dataset"], df["metric"]))
    unshown = np.array([(b, m) not in shown for b, m in zip(scores["benchmark"], scores["metric"])], dtype=bool)
    other = scores[unshown & scores["benchmark"].isin(df["dataset"]).to_numpy()]
    lines += [
        "",
        "Scores in percent. Brackets: bootstrap 95% intervals over the row's questions. A published score "
        "stands on a row only where it was measured with the same scorer on the same split.",
    ]
    if len(other):
        lines += ["", "Published with other protocols (not comparable to a row above):"]
        lines += [
            f"- {NAMES.get(r.benchmark, r.benchmark)} {r.row}, {r.metric}: {r.model} {r.score} (`{r.source}`)"
            for r in other.itertuples()
        ]
    lines += ["", "Sources:"] + [f"- `{k}`: {sources[k]}" for k in sorted({*used, *other["source"]})]
    return "\n".join(lines) + "\n"


def plot(df: pd.DataFrame, path: Path, title: str) -> Path:
    """Horizontal bars with the bootstrap interval, one per row; published scores as markers."""
    models = [
        c for c in df.columns if c not in ("benchmark", "dataset", "row", "metric", "n", "score", "ci_low", "ci_high")
    ]
    labels = [f"{NAMES.get(d, b)} {r}" for b, d, r in zip(df["benchmark"], df["dataset"], df["row"])]
    fig = figure(8.0, 1.4 + 0.36 * max(len(df), 1))
    ax = fig.add_subplot()
    y = np.arange(len(df))
    score = df["score"].astype(float).fillna(0).to_numpy()
    lo = (score - df["ci_low"].astype(float)).fillna(0).to_numpy()
    hi = (df["ci_high"].astype(float) - score).fillna(0).to_numpy()
    ax.barh(y, score, xerr=[lo, hi], color="#4c72b0", ecolor="black", capsize=2, label="this run")
    for i, m in enumerate(models):
        ax.scatter(df[m].astype(float), y, marker="dDsv^"[i % 5], zorder=3, s=28, label=m)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("score (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return atomic_savefig(fig, path, dpi=150)


def write_leaderboard(rows: list[dict], out_dir: Path, title: str) -> pd.DataFrame:
    df, used = leaderboard(rows)
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "leaderboard.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / "leaderboard.md", markdown(df, used, title))
    plot(df, out_dir / "leaderboard.png", title)
    return df


def compare_leaderboards(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Several runs' leaderboards side by side on their common rows: each run's score and interval, the
    difference of each to the first, and the published scores once."""
    key = ["benchmark", "dataset", "row", "metric"]
    base = None
    for label, df in tables.items():
        part = df[key + ["n", "score", "ci_low", "ci_high"]].rename(
            columns={c: f"{label}: {c}" for c in ("n", "score", "ci_low", "ci_high")}
        )
        base = part if base is None else base.merge(part, on=key, how="outer")
    first = next(iter(tables))
    for label in list(tables)[1:]:
        base[f"{label} - {first}"] = (base[f"{label}: score"] - base[f"{first}: score"]).round(DIGITS)
    extra = [c for c in tables[first].columns if c not in key + ["n", "score", "ci_low", "ci_high"]]
    return base.merge(tables[first][key + extra], on=key, how="left")


def comparison_markdown(df: pd.DataFrame, labels: list[str]) -> str:
    head = ["Benchmark", "Split", "Metric", *labels, *(f"{b} - {labels[0]}" for b in labels[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in df.to_dict("records"):
        cells = [
            NAMES.get(r["dataset"], r["benchmark"]),
            r["row"],
            r["metric"],
            *(_cell(r[f"{b}: score"], r[f"{b}: ci_low"], r[f"{b}: ci_high"]) for b in labels),
            *(
                f"{r[f'{b} - {labels[0]}']:+.{DIGITS}f}" if not pd.isna(r[f"{b} - {labels[0]}"]) else "n/a"
                for b in labels[1:]
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nScores in percent; brackets: bootstrap 95% intervals.\n"


def plot_comparison(df: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """Grouped horizontal bars: each row of the leaderboards, one bar per run with its interval."""
    names = [f"{NAMES.get(d, b)} {r}" for b, d, r in zip(df["benchmark"], df["dataset"], df["row"])]
    fig = figure(8.0, 1.4 + 0.25 * len(labels) * max(len(df), 1))
    ax = fig.add_subplot()
    height = 0.8 / len(labels)
    for i, label in enumerate(labels):
        score = df[f"{label}: score"].astype(float)
        err = [
            (score - df[f"{label}: ci_low"].astype(float)).fillna(0),
            (df[f"{label}: ci_high"].astype(float) - score).fillna(0),
        ]
        ax.barh(np.arange(len(df)) + i * height, score.fillna(0), height, xerr=err, capsize=2, label=label)
    ax.set_yticks(np.arange(len(df)) + height * (len(labels) - 1) / 2, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("score (%)")
    ax.legend(fontsize=7, loc="lower right")
    return atomic_savefig(fig, path, dpi=150)
