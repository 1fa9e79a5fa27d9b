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


def bind_paths(cfg: Config, config_path: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """Data, output and cache roots and the recipe's folder, absolute, without paths nested in another.
    A data root that prepare will generate binds its parent; the submission makes missing output and cache
    folders (Apptainer refuses to bind a path that does not exist)."""
    data = Path(cfg.data.root).absolute()
    if not data.exists():
        data = data.parent
    paths = [data, Path(cfg.output_root).absolute(), Path(config_path).absolute().parent,
             *(p.absolute() for p in cache_dirs(env))]
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
        raise ValueError(f"container image {image} does not exist: build it with containers/build.sh "
                         "(see containers/medlava.def) or fix --container / cluster.container")
    return Apptainer(str(Path(image).absolute()), bind_paths(cfg, config_path, {**os.environ, **cfg.cluster.env}))
