"""The `cnn` stage: a timm CNN baseline on the prepared split (two phases, early stopping on validation
macro-F1), whose best checkpoint answers cnn.predict_split into predictions.csv."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, run_dir, start_run
from medlava.stages import STAGES


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.train.checkpoint import check_resume
    from medlava.train.cnn import run_cnn, weight_settings

    c = cfg.cnn
    if c.pretrained and not Path(c.pretrained).is_file():
        raise FileNotFoundError(
            f"cnn.pretrained={c.pretrained} does not exist: download the timm weights of "
            f"{c.arch} to that file, or set cnn.pretrained=null to start from random weights"
        )
    prepared = resolve(cfg, cfg.data.samples, "prepare")
    settings = weight_settings(c, prepared)
    check_resume(run_dir(cfg, "cnn"), dist, c.resume, settings, "epoch")  # before start_run rewrites config.yaml
    run = start_run(cfg, "cnn", dist.rank, *STAGES["cnn"].reuse(cfg))
    result = run_cnn(c, dist, run, prepared, settings)
    if dist.main:
        mark_complete(run, result)
    return run
