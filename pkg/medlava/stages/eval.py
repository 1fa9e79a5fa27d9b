"""The `eval` stage: score an infer (or cnn) run's predictions.csv into metrics.json and plots."""

from __future__ import annotations

import logging
from pathlib import Path

from medlava.config import Config
from medlava.runs import mark_complete, resolve, start_run
from medlava.stages import upstream

log = logging.getLogger(__name__)


def run(cfg: Config, dist=None) -> Path:
    from medlava.eval.run import eval_inputs, evaluate, summary_table

    run = start_run(cfg, "eval")
    source = resolve(cfg, cfg.eval.predictions, upstream("eval"))
    inputs = eval_inputs(source, cfg.eval)
    metrics = evaluate(inputs.csv, run, cfg.eval, inputs.classes, inputs.vocab, inputs.vocab_source)
    mark_complete(run, {"metrics": "metrics.json", "predictions": str(inputs.csv), "family": metrics["family"]})
    print(summary_table(metrics), flush=True)
    log.info("eval: %s metrics of %s -> %s", metrics["family"], inputs.csv, run)
    return run
