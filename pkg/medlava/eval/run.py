"""Score any predictions.csv: pick the metric family from its `task` column, write the metrics
directory, and format the summary table people read first."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medlava.config import EvalConfig
from medlava.eval.closed import CLASSIFICATION_TASKS, evaluate_closed, read_predictions
from medlava.io import InputError
from medlava.runs import is_complete, read_result

HEADLINES = {
    "classification": ("n", "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "unmapped"),
    "vqa": (
        "n_closed",
        "closed_accuracy",
        "closed_unparsed",
        "closed_substring_accuracy",
        "n_open",
        "open_exact_match",
        "open_token_recall",
        "open_token_f1",
        "open_bleu",
        "llava_med_closed_accuracy",
        "llava_med_closed_accuracy_run_eval",
        "llava_med_open_recall",
        "n_multiple_choice",
        "mc_accuracy",
        "mc_unparsed",
        "mmmu_accuracy",
    ),
    "report": (
        "n",
        "bleu_1",
        "bleu_2",
        "bleu_3",
        "bleu_4",
        "rouge_l",
        "chexpert_rules_f1_micro_14",
        "chexpert_rules_f1_macro_14",
        "chexpert_rules_f1_micro_5",
        "chexpert_rules_f1_macro_5",
        "bertscore_f1",
        "chexbert_similarity",
        "empty_predictions",
    ),
}


@dataclass(frozen=True)
class EvalInputs:
    csv: Path
    classes: list[str] | None
    vocab: list[str]
    vocab_source: str | None
    step: int = 0
    """The step of the checkpoint that made the predictions (TensorBoard's x axis)."""
    image_root: Path | None = None
    """Where the predictions' `image` paths are (for previews)."""
    trained_run: Path | None = None
    """The training run whose checkpoint made the predictions, when there is one."""
    split: str | None = None
    """The split that was answered, when the source says."""


def _trained_run(source: Path, result: dict) -> Path | None:
    """The run a checkpoint belongs to (…/RUN/checkpoints/step-N -> RUN), or the cnn run that predicted itself."""
    ckpt = result.get("checkpoint")
    if not ckpt or ckpt == "base":
        return None
    path = Path(ckpt) if Path(ckpt).is_absolute() else source / ckpt
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _image_root(result: dict) -> Path | None:
    if result.get("image_root"):
        return Path(result["image_root"])
    manifest = Path(result["samples"]) / "dataset.json" if result.get("samples") else None
    return Path(json.loads(manifest.read_text())["image_root"]) if manifest and manifest.exists() else None


def eval_inputs(source: Path, cfg: EvalConfig) -> EvalInputs:
    """What to score for `source` (an infer run directory or a predictions CSV): the CSV, the class list the
    infer run recorded, the closed-answer vocabulary (eval.closed_vocab, else the train split of the prepared
    samples the infer run answered from, when it has one), and the checkpoint step, image root and trained run
    its COMPLETE.json names."""
    from medlava.artifacts import step_of
    from medlava.eval.vqa import load_closed_vocab

    source = Path(source)
    csv = source / "predictions.csv" if source.is_dir() else source
    if not csv.exists():
        raise FileNotFoundError(f"{csv} does not exist: give an infer run directory or a predictions CSV")
    result = read_result(source) if is_complete(source) else {}
    vocab_path = Path(cfg.closed_vocab) if cfg.closed_vocab else None
    if vocab_path is None and result.get("samples"):
        train = Path(result["samples"]) / "train.jsonl"
        vocab_path = train if train.exists() else None
    vocab = load_closed_vocab(vocab_path) if vocab_path else []
    step = result.get("step", step_of(result.get("checkpoint") or "base"))
    return EvalInputs(
        csv,
        result.get("classes"),
        vocab,
        str(vocab_path) if vocab_path else None,
        int(step),
        _image_root(result),
        _trained_run(source, result),
        result.get("split"),
    )


def family_of(tasks: Sequence[str], path: Path) -> str:
    """report rows -> report; any open or multiple-choice rows -> vqa (closed rows scored with them); closed/label
    -> classification."""
    present = {str(t) for t in tasks}
    if "report" in present:
        if present != {"report"}:
            raise InputError(
                f"{path}: report rows are mixed with {sorted(present - {'report'})}; score them from "
                "separate files (or set eval.family)"
            )
        return "report"
    if present & {"open", "multiple_choice"}:
        return "vqa"
    if present and present <= set(CLASSIFICATION_TASKS):
        return "classification"
    raise InputError(
        f"{path}: cannot tell the metric family from tasks {sorted(present)}; expected "
        "closed/label, open (+closed) or report, or set eval.family"
    )


def _family(predictions_csv: Path, cfg: EvalConfig) -> tuple[str, pd.DataFrame | None]:
    """(metric family, the predictions when read) of a predictions CSV."""
    if cfg.family == "classification":
        return "classification", None
    df = read_predictions(predictions_csv)
    missing = [c for c in ("id", "prediction", "reference") if c not in df.columns]
    if missing:
        raise InputError(f"{predictions_csv}: missing required column(s) {missing}; have {list(df.columns)}")
    if "task" not in df.columns and cfg.family == "auto":
        raise InputError(f"{predictions_csv}: no `task` column to pick the metrics from; add it or set eval.family")
    family = cfg.family if cfg.family != "auto" else family_of(df["task"].fillna("").unique(), predictions_csv)
    if family == "report" and "task" in df.columns:
        df = df[df["task"].fillna("report") == "report"].reset_index(drop=True)
    return family, df


def evaluate(
    predictions_csv: Path,
    out_dir: Path,
    cfg: EvalConfig,
    classes: Sequence[str] | None = None,
    vocab: list[str] | None = None,
    vocab_source: str | None = None,
    chunk_folder: Path | None = None,
    merge_only: bool = False,
) -> dict[str, Any]:
    """Write the metrics directory of `predictions_csv` into `out_dir`; return metrics.json's content. Reports
    read RadEval's per-report scores from the chunks in `chunk_folder` (with `merge_only`, every chunk must be
    finished; otherwise what is missing is scored here)."""
    predictions_csv = Path(predictions_csv)
    family, df = _family(predictions_csv, cfg)
    if family == "classification":
        return evaluate_closed(predictions_csv, out_dir, classes=classes, n_bootstrap=cfg.n_bootstrap)
    if family == "vqa":
        from medlava.eval.vqa import evaluate_vqa

        return evaluate_vqa(
            df, out_dir, vocab or [], vocab_source, str(predictions_csv), cfg.n_bootstrap, cfg.error_dump
        )
    from medlava.eval.radiology import evaluate_reports

    return evaluate_reports(df, out_dir, cfg, str(predictions_csv), chunk_folder, merge_only)


def score_report_chunk(predictions_csv: Path, cfg: EvalConfig, chunk_idx: int, chunk_folder: Path) -> None:
    """One array task of a report-metric job: RadEval's per-report metrics on chunk `chunk_idx` of eval.chunks."""
    from medlava.eval.report_radeval import scorable, score_chunks, select_metrics

    family, df = _family(Path(predictions_csv), cfg)
    if family != "report":
        raise InputError(
            f"{predictions_csv}: eval.chunks splits report metrics; these are {family} predictions, "
            "scored in one job (set eval.chunks=1)"
        )
    pairs, _ = scorable(df)
    score_chunks(pairs, select_metrics(cfg), [chunk_idx], cfg.chunks, chunk_folder, cfg.batch_size)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def summary_table(metrics: dict[str, Any]) -> str:
    """The family's headline numbers, one per line, with 95% intervals where they were computed; for reports
    also RadEval's results under their own names (and what was left out)."""
    ci = metrics.get("ci95") or {}
    rows = [
        (k, _cell(metrics[k]), "" if not ci.get(k) else f"[{ci[k][0]:.4f}, {ci[k][1]:.4f}]")
        for k in HEADLINES.get(metrics.get("family", ""), ())
        if k in metrics
    ]
    radeval_ci = metrics.get("radeval_ci95") or {}
    rows += [
        (f"radeval {k}", _cell(v), "" if not radeval_ci.get(k) else f"[{radeval_ci[k][0]:.4f}, {radeval_ci[k][1]:.4f}]")
        for k, v in (metrics.get("radeval") or {}).items()
        if isinstance(v, (int, float))
    ]
    if (metrics.get("radeval_skipped") or {}).get("empty_report"):
        rows.append(("radeval skipped (empty report)", str(metrics["radeval_skipped"]["empty_report"]), ""))
    rows += [(f"radeval {k}", "not run", why[:90]) for k, why in (metrics.get("radeval_unavailable") or {}).items()]
    width = max((len(k) for k, _, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  {'value':>10}  95% CI", "-" * (width + 28)]
    lines += [f"{k:<{width}}  {v:>10}  {c}".rstrip() for k, v, c in rows]
    return "\n".join(lines)
