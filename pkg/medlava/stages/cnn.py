"""The `cnn` stage: a timm CNN baseline on the prepared split (two phases, early stopping on validation
macro-F1), whose best checkpoint answers cnn.predict_split into predictions.csv."""

from __future__ import annotations

from pathlib import Path

from medlava.config import Config
from medlava.distributed import Dist


def run(cfg: Config, dist: Dist) -> Path:
    from medlava.train.cnn import run_cnn

    return run_cnn(cfg, dist)
