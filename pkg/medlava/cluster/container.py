"""Apptainer around a job's command: `apptainer exec --nv --bind ... IMAGE <the same torchrun/python line>`.

The node task runs on the host (it needs only Python, submitit and this package) and only the worker
command runs in the image, so the image does not have to match the submitting side's submitit or
cloudpickle. Apptainer passes the job's environment (SLURM_*, MEDLAVA_CACHE, ...) through unless
--cleanenv is given; it is not."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medlava.config import Config

PYTHON = "python"
"""The interpreter inside the image: containers/medlava.def puts its venv first on PATH."""


@dataclass(frozen=True)
class Apptainer:
    image: str
    binds: tuple[str, ...]

    def wrap(self, argv: list[str]) -> list[str]:
        # One --bind per path: a comma inside one flag would split it.
        return ["apptainer", "exec", "--nv", *(f"--bind={b}" for b in self.binds), self.image, *argv]


def cache_dirs(env: Mapping[str, str]) -> list[Path]:
    """Model/tokenizer caches the jobs write: they must be shared and bound, not the image's own $HOME."""
    dirs = [Path(env.get("MEDLAVA_CACHE", Path.home() / ".cache" / "medlava"))]
    dirs += [Path(env[k]) for k in ("HF_HOME", "TORCH_HOME") if env.get(k)]
    return dirs


# Config keys that may name a local file or folder (elsewhere they hold a hub id, `latest` or `none`).
PATH_KEYS = (
    "model.name_or_path",
    "data.image_root",
    "data.split_file",
    "data.samples",
    "data.mimic_cxr.reports_root",
    "data.chexpert_plus.llm.cache_dir",
    "align.init_from",
    "sft.init_from",
    "infer.checkpoint",
    "infer.questions",
    "infer.image_root",
    "eval.predictions",
    "eval.closed_vocab",
    "eval.bertscore_model",
    "eval.bertscore_baseline",
    "eval.chexbert_checkpoint",
    "eval.chexbert_tokenizer",
    "cnn.pretrained",
    "pretrain.text_tower",
    "model.vision_tower",
)


def config_paths(cfg: Config) -> list[Path]:
    """The existing files and folders the recipe names under PATH_KEYS (a file stands for its folder)."""
    out = []
    for key in PATH_KEYS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str) and value and Path(value).exists():
            path = Path(value).absolute()
            out.append(path if path.is_dir() else path.parent)
    return out


def bind_paths(cfg: Config, config_path: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """Data, output and cache roots, the recipe's folder and every local path the recipe names (checkpoints,
    image roots, weights), absolute, without paths nested in another. A data root that prepare will generate
    binds its parent; the submission makes missing output and cache folders (Apptainer refuses to bind a
    path that does not exist)."""
    data = Path(cfg.data.root).absolute()
    if not data.exists():
        data = data.parent
    paths = [
        data,
        Path(cfg.output_root).absolute(),
        Path(config_path).absolute().parent,
        *(p.absolute() for p in cache_dirs(env)),
        *config_paths(cfg),
    ]
    problems = [f"{p}: Apptainer bind paths cannot contain ':' or ','" for p in paths if {":", ","} & set(str(p))]
    if not data.exists():
        problems.append(f"data.root {cfg.data.root} does not exist, nor its parent folder")
    if problems:
        raise ValueError("; ".join(problems))
    keep: list[Path] = []
    for p in sorted(set(paths), key=lambda q: len(q.parts)):
        if not any(p.is_relative_to(k) for k in keep):
            keep.append(p)
    return tuple(str(p) for p in keep)


def apptainer_for(cfg: Config, config_path: str) -> Apptainer | None:
    """The job's container from cluster.container (None without one); refuses a missing image."""
    image = cfg.cluster.container
    if image is None:
        return None
    if not Path(image).is_file():
        raise ValueError(
            f"container image {image} does not exist: build it with containers/build.sh "
            "(see containers/medlava.def) or fix --container / cluster.container"
        )
    return Apptainer(str(Path(image).absolute()), bind_paths(cfg, config_path, {**os.environ, **cfg.cluster.env}))
