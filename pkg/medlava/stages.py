"""`prepare` and `eval`: the stages that hold no model. (align/sft: medlava.train.stages; infer:
medlava.infer.stage.)"""

from __future__ import annotations

import logging
from pathlib import Path

from medlava.config import Config
from medlava.runs import mark_complete, read_result, resolve, start_run

log = logging.getLogger(__name__)


def run_prepare(cfg: Config) -> Path:
    from medlava.data.ham10000 import prepare_ham10000
    from medlava.data.synthetic import make_synthetic_ham10000

    run = start_run(cfg, "prepare")
    root = Path(cfg.data.root)
    if cfg.data.synthetic is not None and not root.exists():
        s = cfg.data.synthetic
        make_synthetic_ham10000(root, n_lesions=s.n_lesions, max_images_per_lesion=s.max_images_per_lesion,
                                image_size=s.image_size, seed=s.seed)
        log.info("wrote a synthetic HAM10000 (%d lesions) to %s", s.n_lesions, root)
    summary = prepare_ham10000(root, run, ratios=cfg.data.split_ratios, seed=cfg.data.seed,
                               split_file=Path(cfg.data.split_file) if cfg.data.split_file else None,
                               skip_missing=cfg.data.skip_missing_images)
    mark_complete(run, {"splits": summary["splits"], "skipped": summary.get("skipped")})
    log.info("prepare: %s samples in %s", summary["splits"], run)
    return run


def run_eval(cfg: Config) -> Path:
    from medlava.eval.report import evaluate_closed

    run = start_run(cfg, "eval")
    source = resolve(cfg, cfg.eval.predictions, "infer")
    csv = source if source.suffix == ".csv" else source / "predictions.csv"
    classes = read_result(source).get("classes") if source.is_dir() else None
    metrics = evaluate_closed(csv, run, classes=classes, n_bootstrap=cfg.eval.n_bootstrap)
    mark_complete(run, {"metrics": "metrics.json", "predictions": str(csv)})
    log.info("eval: accuracy %.3f, macro-F1 %.3f, macro-AUC %s -> %s", metrics["accuracy"], metrics["macro_f1"],
             f"{metrics['macro_auc']:.3f}" if metrics.get("macro_auc") is not None else "n/a", run)
    return run
