"""The `prepare` stage: the raw dataset as distributed -> sample JSONL and splits in the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

from medlava.config import Config
from medlava.runs import mark_complete, start_run
from medlava.stages import CheckFailed

log = logging.getLogger(__name__)


def run(cfg: Config, dist=None, check: bool = False) -> Path:
    """The dataset named by data.dataset -> sample JSONL in the run directory. With `check`, nothing is
    written but prepare_report.json: every problem is listed (printed, and CheckFailed when there are any)."""
    from medlava.data.prepare import finish
    from medlava.data.problems import Problems
    from medlava.data.registry import load_dataset
    from medlava.io import InputError, atomic_write_json

    run = start_run(cfg, "prepare")
    problems = Problems(check=check, skip=set(cfg.data.skip))
    try:
        summary = finish(load_dataset(cfg, problems, run), run, problems, cfg.data.verify_images, cfg.data.workers)
    except InputError as e:
        if not check:
            raise
        problems.fatal(e)  # the source could not be read on: what was found before still counts
        atomic_write_json(run / "prepare_report.json", {**problems.report(), "dataset": cfg.data.dataset})
    if check:
        print(f"medlava prepare --check ({cfg.data.dataset}, {cfg.data.root}): {problems.render()}", flush=True)
        log.info("check: %s (report: %s)", "ok" if problems.ok else "problems found", run / "prepare_report.json")
        if not problems.ok:
            raise CheckFailed(run / "prepare_report.json")
        return run
    mark_complete(run, {"splits": summary["splits"], "skipped": {k: v for k, v in summary["skipped"].items() if v}})
    log.info("prepare: %s samples in %s", summary["splits"], run)
    return run
