"""One registry: dataset name (data.dataset) -> the adapter that reads it as distributed. Each adapter is
`load(cfg, problems, out_dir) -> Loaded`; modules are imported only when their dataset is prepared."""

from __future__ import annotations

import importlib
from pathlib import Path

from medlava.config import Config
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems

DATASETS = {
    "ham10000": "medlava.data.ham10000",
    "slake": "medlava.data.slake",
    "mimic_cxr": "medlava.data.mimic_cxr",
    "chexpert_plus": "medlava.data.chexpert_plus",
    "llava_med": "medlava.data.llava_med",
    "vqa_rad": "medlava.data.vqa_rad",
    "path_vqa": "medlava.data.path_vqa",
    "pmc_vqa": "medlava.data.pmc_vqa",
    "omnimedvqa": "medlava.data.omnimedvqa",
    "medxpertqa": "medlava.data.medxpertqa",
    "mmmu_med": "medlava.data.mmmu_med",
}


def load_dataset(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    if cfg.data.synthetic is not None:  # the config allows it for ham10000 only
        from medlava.data.synthetic import ensure_synthetic_ham10000

        ensure_synthetic_ham10000(Path(cfg.data.root), cfg.data.synthetic)
    return importlib.import_module(DATASETS[cfg.data.dataset]).load(cfg, problems, Path(out_dir))
