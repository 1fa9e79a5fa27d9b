"""PathVQA (He et al. 2020) -> VQA samples, from its Hugging Face copy flaviagiammarino/path-vqa
(data/{train,validation,test}-*.parquet: image {bytes, path}, question, answer; 19,654 / 6,259 / 6,719 rows, the
authors' split). Yes/no answers are the closed questions (the card's "binary yes/no questions", LLaVA-Med's
CLOSED), the rest open."""

from __future__ import annotations

import logging
from pathlib import Path

from medlava.config import Config
from medlava.data.benchmark import hf_vqa
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "val": "validation", "test": "test"}


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    loaded = hf_vqa("path_vqa", Path(cfg.data.root), out_dir, problems, SPLITS, cfg.data.path_vqa.instruction)
    log.info("path_vqa: %d questions %s", len(loaded.samples), loaded.summary["stats"])
    return loaded
