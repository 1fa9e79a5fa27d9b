"""The `cnn` stage: a timm CNN baseline on the prepared split (two phases, early stopping on validation
macro-F1), whose best checkpoint answers cnn.predict_split into predictions.csv."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist
from medlava.runs import mark_complete, resolve, start_run


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.train.cnn import run_cnn

    c = cfg.cnn
    if c.pretrained and not Path(c.pretrained).is_file():
        raise FileNotFoundError(f"cnn.pretrained={c.pretrained} does not exist: download the timm weights of "
                                f"{c.arch} to that file, or set cnn.pretrained=null to start from random weights")
    run = start_run(cfg, "cnn", dist.rank, "always" if c.resume == "auto" else "never",
                    " (or cnn.resume=auto to continue it)")
    result = run_cnn(c, dist, run, resolve(cfg, cfg.data.samples, "prepare"))
    if dist.main:
        mark_complete(run, result)
    return run
