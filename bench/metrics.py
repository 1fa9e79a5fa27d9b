#!/usr/bin/env python
"""Report metrics at scale: N synthetic report pairs (default 100,000) through BLEU-1..4, ROUGE-L and the
rule-based CheXpert labeler (both sides labelled, label F1 computed), as `medlava metrics` runs them; then
RadEval's metrics, reports/s each, on the first --radeval pairs, printed beside that baseline's pairs/s.

    python bench/metrics.py [--n 100000] [--seed 0]
    python bench/metrics.py --radeval 512 --metric-cache /shared/metric-weights [--report-metrics a,b]
    python bench/metrics.py --radeval 256 --tiny      # tiny random weights (tests/fixtures): overhead only

Target (issue 5): 100,000 pairs in under 2 minutes on a 2-core CPU. Reports are built from a findings
grammar (sides, sizes, negation, uncertainty, devices), 5-9 sentences, ~45 words (MIMIC-CXR findings length).
RadEval's metrics run on the GPU when there is one (cuda:0), else on the CPU; the speed of the real models is
what the cluster's metric job will see; the tiny weights only measure medlava's and RadEval's own overhead.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

from medlava.config import EvalConfig  # noqa: E402
from medlava.eval.radiology import report_metrics  # noqa: E402

SIDES = ["left", "right", "bilateral", "bibasilar", "left basilar", "right upper lobe", "left lower lobe"]
SIZES = ["small", "moderate", "large", "trace", "mild"]
FINDINGS = [
    "pleural effusion",
    "pneumothorax",
    "consolidation",
    "atelectasis",
    "opacity",
    "pulmonary edema",
    "pneumonia",
    "nodule",
]
TEMPLATES = [
    "There is a {size} {side} {finding}.",
    "No {finding} is seen.",
    "There is no {finding} or {finding2}.",
    "{Side} {finding} may represent {finding2}.",
    "Possible {side} {finding}.",
    "{Finding} cannot be excluded.",
    "Interval improvement of the {side} {finding}.",
    "The heart size is normal.",
    "Mild cardiomegaly is unchanged.",
    "The cardiomediastinal silhouette is within normal limits.",
    "Mediastinal and hilar contours are stable.",
    "A right internal jugular central venous catheter terminates in the mid SVC.",
    "An endotracheal tube terminates 4 cm above the carina.",
    "No acute cardiopulmonary process.",
    "Lungs are well expanded and clear.",
    "Osseous structures are intact without acute fracture.",
    "Degenerative changes are noted in the thoracic spine.",
    "Pulmonary vascular congestion is present.",
]


def report(rng: random.Random) -> str:
    out = []
    for template in rng.sample(TEMPLATES, rng.randint(5, 9)):
        f1, f2 = rng.sample(FINDINGS, 2)
        side = rng.choice(SIDES)
        out.append(
            template.format(
                size=rng.choice(SIZES),
                side=side,
                Side=side.capitalize(),
                finding=f1,
                Finding=f1.capitalize(),
                finding2=f2,
            )
        )
    return " ".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--radeval", type=int, default=0, help="also time RadEval's metrics on this many pairs")
    p.add_argument("--metric-cache", help="staged metric weights (medlava weights fetch)")
    p.add_argument("--tiny", action="store_true", help="time on tiny random weights (built into a temp folder)")
    p.add_argument("--report-metrics", help="comma-separated RadEval metrics (default: those without an LLM)")
    p.add_argument("--batch-size", type=int, default=32, help="reports per scoring call (eval.batch_size)")
    args = p.parse_args(argv)
    if args.radeval and not (args.metric_cache or args.tiny):
        p.error("--radeval needs --metric-cache DIR (staged weights) or --tiny")
    rng = random.Random(args.seed)
    df = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(args.n)],
            "reference": [report(rng) for _ in range(args.n)],
            "prediction": [report(rng) for _ in range(args.n)],
        }
    )
    words = df["reference"].str.split().str.len().mean()
    print(
        f"{args.n} pairs, {words:.1f} words per report on average; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    start = time.perf_counter()
    m, _, _, _ = report_metrics(df, EvalConfig())
    seconds = time.perf_counter() - start
    print(
        f"BLEU-1..4, ROUGE-L, labeler (2 x {args.n} reports) and label F1: {seconds:.1f} s, "
        f"{args.n / seconds:,.0f} pairs/s"
    )
    print(
        "  "
        + "  ".join(
            f"{k} {m[k]:.4f}"
            for k in ("bleu_1", "bleu_4", "rouge_l", "chexpert_rules_f1_micro_14", "chexpert_rules_f1_macro_5")
        )
    )
    ok = seconds < 120 or args.n < 100_000
    print("target (100,000 pairs < 120 s):", "met" if ok else "MISSED")
    if args.radeval:
        radeval(df.head(args.radeval), args, args.n / seconds)
    return 0 if ok else 1


def radeval(df: pd.DataFrame, args: argparse.Namespace, baseline: float) -> None:
    """Reports/s of each RadEval metric (models loaded first, not timed), as medlava's chunk tasks score them."""
    import tempfile

    import torch
    from medlava.eval.radeval_scorers import NO_LLM, load_scorers, use_cache

    cache = args.metric_cache
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fixtures.metric_weights import NEEDS, build

        cache = build(Path(tempfile.mkdtemp(prefix="tiny-metric-weights-")), list(NEEDS))
    use_cache(Path(cache))
    names = args.report_metrics.split(",") if args.report_metrics else list(NO_LLM)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"RadEval on {len(df)} pairs, {device}, {'tiny random' if args.tiny else 'staged'} weights in {cache}; "
        f"baseline (BLEU/ROUGE/rules above) {baseline:,.0f} pairs/s"
    )
    refs, hyps = df["reference"].tolist(), df["prediction"].tolist()
    for name in names:
        try:
            scorer = load_scorers([name], refs)[name]
        except (ImportError, ValueError) as e:
            print(f"  {name:<11} not run: {str(e)[:150]}")
            continue
        start = time.perf_counter()
        for i in range(0, len(refs), args.batch_size):
            scorer.score(refs[i : i + args.batch_size], hyps[i : i + args.batch_size])
        rate = len(refs) / (time.perf_counter() - start)
        print(f"  {name:<11} {rate:10,.1f} reports/s  ({rate / baseline:.4f} x the baseline)")


if __name__ == "__main__":
    sys.exit(main())
