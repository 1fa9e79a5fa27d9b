"""Radiology report metrics: the field's own, computed by RadEval (F1-CheXbert, F1-RadGraph, RadCliQ-v1,
RaTEScore, GREEN, BERTScore, BLEU, ROUGE; medlava.eval.report_radeval) under `radeval` in metrics.json; and
medlava's weight-free ones: BLEU-1..4 and ROUGE-L in the R2Gen convention, CheXpert-label precision/recall/F1
from medlava's rule-based labeler (the F1-CheXbert protocol with another labeler, named `chexpert_rules`, the
fallback when no CheXbert weights are staged), and, when their weights are given, BERTScore and
CheXbert-embedding similarity.

Inputs are (id, reference, prediction) rows: from a predictions.csv (task `report`) or from two CSVs with
`study_id` and `report` (seed 003 / CXR-Report-Metric). An empty report is scored as empty text (zero
overlap; the labeler finds nothing in it) and counted in `empty_predictions` / `empty_references`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from medlava.config import EvalConfig
from medlava.data import chexpert
from medlava.eval.plots import plot_bars
from medlava.eval.text import corpus_bleu, pair_scores, report_tokens
from medlava.io import InputError, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
REPORT_COLUMNS = ("study_id", "report")
OUTPUTS = (
    "metrics.json",
    "per_sample.csv",
    "labels_reference.csv",
    "labels_prediction.csv",
    "errors.csv",
    "chexpert_rules_f1.png",
    "published.png",
)
RADEVAL_CHUNKS = "radeval-chunks"


def read_reports(path: Path) -> pd.DataFrame:
    """A (study_id, report) CSV; ids unique and present, an empty report kept as ""."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable reports CSV ({e})") from None
    missing = [c for c in REPORT_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; a reports CSV has `study_id` and `report` (has {list(df.columns)})"
        )
    blank = df.index[df["study_id"].str.strip() == ""]
    if len(blank):
        raise InputError(f"{path}:{blank[0] + 2}: empty study_id; every report needs its study's id")
    dup = df["study_id"].duplicated()
    if dup.any():
        first = df.index[dup][0]
        raise InputError(f"{path}:{first + 2}: study_id {df['study_id'][first]!r} appears twice; one report per study")
    return df


def join_reports(gt: pd.DataFrame, pred: pd.DataFrame, gt_path: Path, pred_path: Path) -> pd.DataFrame:
    """(id, reference, prediction) in the ground truth's order; every study must be in both files."""
    only_gt = sorted(set(gt["study_id"]) - set(pred["study_id"]))
    only_pred = sorted(set(pred["study_id"]) - set(gt["study_id"]))
    if only_gt or only_pred:
        raise InputError(
            f"study ids differ: {len(only_gt)} only in {gt_path} {only_gt[:5]}, {len(only_pred)} only in "
            f"{pred_path} {only_pred[:5]}; give every study a row in both (an empty report is allowed)"
        )
    merged = gt.merge(pred, on="study_id", suffixes=("_gt", "_pred"), validate="one_to_one", sort=False)
    return pd.DataFrame(
        {"id": merged["study_id"], "reference": merged["report_gt"], "prediction": merged["report_pred"]}
    )


def binarize(labels: np.ndarray, uncertain_as_positive: bool) -> np.ndarray:
    """CheXpert labels (1/0/-1, NaN = not mentioned) -> positive indicator."""
    return (labels == chexpert.POSITIVE) | (uncertain_as_positive & (labels == chexpert.UNCERTAIN))


def label_scores(ref: np.ndarray, pred: np.ndarray, uncertain_as_positive: bool) -> dict[str, Any]:
    """Micro, macro and example-based precision/recall/F1 over the 14 and the 5 observations, and per
    observation, as f1chexbert computes them with scikit-learn (ill-defined ratios count 0)."""
    y_ref, y_pred = binarize(ref, uncertain_as_positive), binarize(pred, uncertain_as_positive)
    out: dict[str, Any] = {}
    for name, cols in (
        ("14", list(range(len(chexpert.OBSERVATIONS)))),
        ("5", [chexpert.OBSERVATIONS.index(o) for o in chexpert.FIVE]),
    ):
        for average in ("micro", "macro", "samples"):
            p, r, f, _ = precision_recall_fscore_support(
                y_ref[:, cols], y_pred[:, cols], average=average, zero_division=0
            )
            key = "example" if average == "samples" else average
            out[f"{key}_{name}"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    p, r, f, support = precision_recall_fscore_support(y_ref, y_pred, average=None, zero_division=0)
    out["per_label"] = {
        o: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(support[i]),
            "predicted": int(y_pred[:, i].sum()),
        }
        for i, o in enumerate(chexpert.OBSERVATIONS)
    }
    return out


def _labels(texts: pd.Series) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in chexpert.label_reports(texts)], dtype=float)


def report_metrics(df: pd.DataFrame, cfg: EvalConfig) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray, np.ndarray]:
    """(metrics, per-sample table, reference labels, prediction labels) for (id, reference, prediction) rows."""
    if df.empty:
        raise InputError("no reports to score")
    refs, hyps = df["reference"].fillna("").astype(str), df["prediction"].fillna("").astype(str)
    start = time.perf_counter()
    pairs = pair_scores([report_tokens(h) for h in hyps], [report_tokens(r) for r in refs])
    ref_labels, pred_labels = _labels(refs), _labels(hyps)
    labels = label_scores(ref_labels, pred_labels, cfg.uncertain_as_positive)
    metrics: dict[str, Any] = {
        "family": "report",
        "n": len(df),
        "empty_predictions": int((hyps.str.strip() == "").sum()),
        "empty_references": int((refs.str.strip() == "").sum()),
        **{f"bleu_{n}": corpus_bleu(pairs["bleu_stats"], n) for n in range(1, 5)},
        "rouge_l": float(pairs["rouge_l"].mean()),
        "rouge_l_coco": float(pairs["rouge_l_coco"].mean()),
        "chexpert_rules": {"labeler": chexpert.LABELER, "uncertain_as_positive": cfg.uncertain_as_positive, **labels},
        **{
            f"chexpert_rules_f1_{k}": labels[k]["f1"]
            for k in ("micro_14", "macro_14", "example_14", "micro_5", "macro_5", "example_5")
        },
        "conventions": {
            "tokens": "lower case, '.' kept as a token, other punctuation dropped",
            "bleu": "corpus BLEU-n (sacrebleu statistics summed over pairs, no smoothing), as pycocoevalcap",
            "rouge_l": "mean LCS F1 per pair (rouge-score); rouge_l_coco: beta 1.2 (pycocoevalcap)",
            "chexpert_rules": "labels from medlava's rule-based labeler; uncertain counts as "
            + ("positive" if cfg.uncertain_as_positive else "negative"),
        },
    }
    per_sample = pd.DataFrame(
        {
            "id": df["id"].astype(str).to_numpy(),
            "bleu_4": pairs["sentence_bleu_4"],
            "rouge_l": pairs["rouge_l"],
            "rouge_l_coco": pairs["rouge_l_coco"],
            "label_disagreements": (
                binarize(ref_labels, cfg.uncertain_as_positive) != binarize(pred_labels, cfg.uncertain_as_positive)
            ).sum(axis=1),
        }
    )
    if cfg.bertscore_model:
        from medlava.eval.neural import bertscore

        scores = bertscore(
            list(hyps), list(refs), cfg.bertscore_model, cfg.bertscore_layers, cfg.bertscore_baseline, cfg.batch_size
        )
        per_sample["bertscore_f1"] = scores["bertscore_f1"]
        metrics.update({k: float(v.mean()) for k, v in scores.items()})
        metrics["bertscore"] = {
            "model": cfg.bertscore_model,
            "layers": cfg.bertscore_layers,
            "baseline": cfg.bertscore_baseline,
            "idf": False,
        }
    if cfg.chexbert_checkpoint:
        from medlava.eval.neural import chexbert_similarity

        sim = chexbert_similarity(
            list(hyps), list(refs), cfg.chexbert_checkpoint, cfg.chexbert_tokenizer, cfg.batch_size
        )
        per_sample["chexbert_similarity"] = sim
        metrics["chexbert_similarity"] = float(sim.mean())
        metrics["chexbert"] = {"checkpoint": cfg.chexbert_checkpoint, "tokenizer": cfg.chexbert_tokenizer}
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    log.info(
        "report metrics: %d pairs in %.1f s (%.0f pairs/s)",
        len(df),
        metrics["seconds"],
        len(df) / max(metrics["seconds"], 1e-9),
    )
    return metrics, per_sample, ref_labels, pred_labels


def _labels_csv(ids: pd.Series, labels: np.ndarray) -> str:
    df = pd.DataFrame(labels, columns=list(chexpert.OBSERVATIONS)).astype("Int64")
    df.insert(0, "study_id", ids.astype(str).to_numpy())
    return df.to_csv(index=False)


def evaluate_reports(
    df: pd.DataFrame,
    out_dir: Path,
    cfg: EvalConfig,
    source: str,
    chunk_folder: Path | None = None,
    merge_only: bool = False,
) -> dict[str, Any]:
    """Score (id, reference, prediction) rows and write metrics.json, per_sample.csv, both label tables,
    errors.csv (lowest ROUGE-L first), a per-observation F1 chart and, with RadEval's metrics, published.png.
    RadEval's per-report metrics are read from the chunks in `chunk_folder` (default out_dir/radeval-chunks):
    array tasks wrote them, or, unless `merge_only`, the missing ones are scored here first."""
    from medlava.eval.report_radeval import merge_scores, scorable, score_chunks, select_metrics

    out_dir = Path(out_dir)
    selection = select_metrics(cfg)
    metrics, per_sample, ref_labels, pred_labels = report_metrics(df, cfg)
    pairs, skipped = scorable(df)
    if selection.metrics and len(pairs):
        folder = Path(chunk_folder) if chunk_folder else out_dir / RADEVAL_CHUNKS
        if not merge_only:
            score_chunks(pairs, selection, list(range(cfg.chunks)), cfg.chunks, folder, cfg.batch_size)  # resumes
        part, table = merge_scores(pairs, selection, cfg.chunks, folder, cfg.n_bootstrap)
        metrics |= part
        per_sample = per_sample.merge(table, on="id", how="left", validate="one_to_one")
    metrics |= {
        "radeval_metrics": selection.metrics,
        "radeval_unavailable": selection.unavailable,
        "radeval_pairs": len(pairs) if selection.metrics else 0,
        "radeval_skipped": {"empty_report": len(skipped), "ids": skipped[:20]},
        "radeval_weights": str(selection.cache) if selection.per_report else None,
    }
    metrics["source"] = source
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUTS:
        (out_dir / stale).unlink(missing_ok=True)
    atomic_write_text(out_dir / "per_sample.csv", per_sample.to_csv(index=False))
    atomic_write_text(out_dir / "labels_reference.csv", _labels_csv(df["id"], ref_labels))
    atomic_write_text(out_dir / "labels_prediction.csv", _labels_csv(df["id"], pred_labels))
    worst = per_sample.assign(reference=df["reference"].to_numpy(), prediction=df["prediction"].to_numpy())
    worst = worst.sort_values(["rouge_l", "id"], kind="stable").head(cfg.error_dump)
    atomic_write_text(out_dir / "errors.csv", worst.to_csv(index=False))
    per_label = metrics["chexpert_rules"]["per_label"]
    plot_bars(
        {
            f"{o} (n={v['support']})": v["f1"] if v["support"] or v["predicted"] else None  # undefined: n/a
            for o, v in per_label.items()
        },
        out_dir / "chexpert_rules_f1.png",
        title=f"F1 per observation, {chexpert.LABELER.split(' (')[0]} labels (n={metrics['n']} reports)",
        xlabel="F1",
    )
    if metrics.get("radeval"):
        from medlava.eval.published_reports import plot_published

        plot_published(metrics["radeval"], out_dir / "published.png")
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
