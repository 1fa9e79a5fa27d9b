"""Scoring commands that need no config file:

medlava eval --predictions predictions.csv --out DIR        any CSV of the predictions contract (or an infer run)
medlava metrics --gt gt.csv --pred pred.csv --out DIR       reports as two CSVs with study_id and report
medlava label-reports --reports reports.csv --out labels.csv   14 CheXpert observations: 1, 0, -1 or empty
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from medlava.config import ConfigError, EvalConfig
from medlava.io import InputError, atomic_write_text


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--error-dump", type=int, default=50, help="worst samples listed in errors.csv")
    p.add_argument(
        "--uncertain-as-positive",
        action="store_true",
        help="reports: count an uncertain CheXpert label as positive (f1chexbert's rrg mode)",
    )
    p.add_argument("--bertscore-model", help="reports: BERTScore encoder (local directory or cached hub id)")
    p.add_argument(
        "--bertscore-layers", type=int, help="reports: BERTScore layer (default: bert-score's for the model)"
    )
    p.add_argument("--bertscore-baseline", help="reports: bert-score baseline TSV to rescale with")
    p.add_argument("--chexbert-checkpoint", help="reports: chexbert.pth for CheXbert-embedding similarity")
    p.add_argument("--chexbert-tokenizer", default="bert-base-uncased", help="reports: the CheXbert tokenizer")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the model-based metrics")
    p.add_argument(
        "--report-metrics",
        help="reports: RadEval metrics, comma-separated (bleu, rouge, bertscore, "
        "f1chexbert, radgraph, radcliq, ratescore, green); default: those without an LLM that can run",
    )
    p.add_argument("--metric-cache", help="reports: staged metric weights (medlava weights fetch --cache DIR)")


def _config(args: argparse.Namespace, **extra) -> EvalConfig:
    return EvalConfig(
        n_bootstrap=args.n_bootstrap,
        error_dump=args.error_dump,
        uncertain_as_positive=args.uncertain_as_positive,
        bertscore_model=args.bertscore_model,
        bertscore_layers=args.bertscore_layers,
        bertscore_baseline=args.bertscore_baseline,
        chexbert_checkpoint=args.chexbert_checkpoint,
        chexbert_tokenizer=args.chexbert_tokenizer,
        batch_size=args.batch_size,
        metric_cache=args.metric_cache,
        report_metrics=[m for m in args.report_metrics.split(",") if m] if args.report_metrics else None,
        **extra,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medlava", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "eval",
        help="score a predictions CSV (metric family from its task column)",
        description="Score a predictions CSV or infer run directory. (`medlava eval --config FILE "
        "[key=value ...]` runs the eval stage of a recipe instead.)",
    )
    e.add_argument("--predictions", required=True, type=Path, help="predictions.csv or an infer run directory")
    e.add_argument("--out", required=True, type=Path, help="metrics directory to write")
    e.add_argument("--family", choices=["auto", "classification", "vqa", "report"], default="auto")
    e.add_argument("--classes", help="comma-separated class list (classification; default: score columns)")
    e.add_argument("--closed-vocab", help="VQA: closed-answer vocabulary (JSON list or sample JSONL)")
    _eval_options(e)
    m = sub.add_parser("metrics", help="score generated reports against references (two CSVs)")
    m.add_argument("--gt", required=True, type=Path, help="CSV with study_id, report (references)")
    m.add_argument("--pred", required=True, type=Path, help="CSV with study_id, report (generated)")
    m.add_argument("--out", required=True, type=Path, help="metrics directory to write")
    _eval_options(m)
    lab = sub.add_parser("label-reports", help="label reports with the rule-based CheXpert labeler")
    lab.add_argument("--reports", required=True, type=Path, help="CSV with study_id, report")
    lab.add_argument("--out", required=True, type=Path, help="labels CSV to write")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "label-reports":
            from medlava.data.chexpert import OBSERVATIONS, labels_frame
            from medlava.eval.radiology import read_reports

            reports = read_reports(args.reports)
            labels = labels_frame(reports["report"].tolist())
            labels.insert(0, "study_id", reports["study_id"].to_numpy())
            atomic_write_text(args.out, labels.to_csv(index=False))
            counts = {o: int((labels[o] == 1).sum()) for o in OBSERVATIONS}
            print(f"labelled {len(labels)} reports -> {args.out}; positives per observation: {counts}")
            return 0
        from medlava.eval.run import eval_inputs, evaluate, summary_table

        if args.command == "metrics":
            from medlava.eval.radiology import (
                evaluate_reports,
                join_reports,
                read_reports,
            )

            df = join_reports(read_reports(args.gt), read_reports(args.pred), args.gt, args.pred)
            metrics = evaluate_reports(df, args.out, _config(args), f"{args.gt} + {args.pred}")
        else:
            cfg = _config(args, family=args.family, closed_vocab=args.closed_vocab)
            inputs = eval_inputs(args.predictions, cfg)
            classes = args.classes.split(",") if args.classes else inputs.classes
            metrics = evaluate(inputs.csv, args.out, cfg, classes, inputs.vocab, inputs.vocab_source)
    except (InputError, ConfigError, FileNotFoundError, ValidationError) as e:  # ValidationError: out of range
        print(f"medlava {args.command}: {e}", file=sys.stderr)
        return 2
    print(summary_table(metrics))
    print(f"\n{metrics['family']} metrics -> {args.out}/metrics.json")
    return 0
