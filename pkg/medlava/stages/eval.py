"""The `eval` stage: score an infer (or cnn) run's predictions.csv into metrics.json and plots."""

from __future__ import annotations

import logging
from pathlib import Path

from medlava.config import Config
from medlava.runs import mark_complete, resolve, start_run
from medlava.stages import upstream

log = logging.getLogger(__name__)


def run(cfg: Config, dist=None) -> Path:
    from medlava.eval.closed import read_predictions
    from medlava.eval.run import eval_inputs, evaluate, summary_table
    from medlava.eval.tensorboard import write_eval_tensorboard

    run = start_run(cfg, "eval")
    source = resolve(cfg, cfg.eval.predictions, upstream("eval"))
    inputs = eval_inputs(source, cfg.eval)
    metrics = evaluate(inputs.csv, run, cfg.eval, inputs.classes, inputs.vocab, inputs.vocab_source)
    curve = inputs.trained_run / "tensorboard" / f"eval-{inputs.split or 'predictions'}" if inputs.trained_run else None
    written = write_eval_tensorboard(run, metrics, read_predictions(inputs.csv), inputs.step, inputs.image_root, curve)
    mark_complete(run, {"metrics": "metrics.json", "predictions": str(inputs.csv), "family": metrics["family"],
                        "step": inputs.step, "tensorboard": written,
                        "curve": str(curve) if curve else None})
    print(summary_table(metrics), flush=True)
    log.info("eval: %s metrics of %s -> %s", metrics["family"], inputs.csv, run)
    return run
