"""The `eval` stage: score an infer (or cnn) run's predictions.csv into metrics.json, plots and TensorBoard.

Report predictions with eval.chunks > 1 are a job array and a merge, like infer: task i scores RadEval's
per-report metrics of chunk i (`--chunk-idx i`) into the run's radeval-chunks/, resumably; the merge
(`--merge-only`) requires every chunk and writes the metrics once."""

from __future__ import annotations

import logging
from pathlib import Path

from medlava.config import Config
from medlava.runs import mark_complete, resolve, start_run
from medlava.stages import upstream

log = logging.getLogger(__name__)


def preflight(cfg: Config) -> list[str]:
    """eval.report_metrics given as a list must all run: each one importable here and its staged weights present
    with their recorded sizes and hashes (the default set is resolved when the job runs)."""
    if cfg.eval.report_metrics is None:
        return []
    from medlava.config import ConfigError
    from medlava.eval.report_radeval import select_metrics

    try:
        select_metrics(cfg.eval)
    except ConfigError as e:
        return [str(e)]
    return []


def doctor_args(cfg: Config) -> list[str]:
    """`medlava doctor` options that check the report metrics' weights from where the jobs run."""
    from medlava.eval.report_radeval import metric_cache

    args = ["--metric-cache", str(metric_cache(cfg.eval).absolute())]
    return args + (["--report-metrics", ",".join(cfg.eval.report_metrics)] if cfg.eval.report_metrics else [])


def run(cfg: Config, dist=None, chunk_idx: int | None = None, merge_only: bool = False) -> Path:
    from medlava.eval.closed import read_predictions
    from medlava.eval.radiology import RADEVAL_CHUNKS
    from medlava.eval.run import eval_inputs, evaluate, score_report_chunk, summary_table
    from medlava.eval.tensorboard import write_eval_tensorboard

    run = start_run(cfg, "eval")  # array tasks and the merge share it, until it is complete
    source, chunks = resolve(cfg, cfg.eval.predictions, upstream("eval")), run / RADEVAL_CHUNKS
    inputs = eval_inputs(source, cfg.eval)
    if chunk_idx is not None:
        score_report_chunk(inputs.csv, cfg.eval, chunk_idx, chunks)
        log.info("eval: chunk %d of %d scored into %s", chunk_idx, cfg.eval.chunks, chunks)
        return run
    metrics = evaluate(
        inputs.csv,
        run,
        cfg.eval,
        inputs.classes,
        inputs.vocab,
        inputs.vocab_source,
        chunk_folder=chunks,
        merge_only=merge_only,
    )
    curve = inputs.trained_run / "tensorboard" / f"eval-{inputs.split or 'predictions'}" if inputs.trained_run else None
    written = write_eval_tensorboard(run, metrics, read_predictions(inputs.csv), inputs.step, inputs.image_root, curve)
    mark_complete(
        run,
        {
            "metrics": "metrics.json",
            "predictions": str(inputs.csv),
            "family": metrics["family"],
            "step": inputs.step,
            "tensorboard": written,
            "curve": str(curve) if curve else None,
        },
    )
    print(summary_table(metrics), flush=True)
    log.info("eval: %s metrics of %s -> %s", metrics["family"], inputs.csv, run)
    return run
