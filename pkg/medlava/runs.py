"""Run directories `<output_root>/<name>/<stage>/<run_id>/` and how stages find each other's outputs.

A run is complete when its COMPLETE.json exists (written last, atomically); `latest` always means the
newest complete run, so a killed or half-written run is never taken as an input.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import sys
import time
from pathlib import Path
from typing import Literal

from medlava.config import Config, ConfigError, dump_config
from medlava.io import atomic_write_json, atomic_write_text

COMPLETE = "COMPLETE.json"


def new_run_id() -> str:
    """The time, for reading, and 32 random bits, so two launches in the same second get different ids."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def stage_root(cfg: Config, stage: str) -> Path:
    return Path(cfg.output_root) / cfg.name / stage


def run_dir(cfg: Config, stage: str) -> Path:
    if cfg.run_id is None:
        raise ValueError("run_id is not set (the launcher sets it; under torchrun pass run_id=... yourself)")
    return stage_root(cfg, stage) / cfg.run_id


def check_reuse(path: Path, stage: str, reuse: Literal["never", "unfinished"], hint: str = "") -> None:
    """ConfigError when `path` holds a run an earlier launch started (it has run.json) that this one may not
    continue: a complete run is never rewritten (its config, result and `latest` stay as they are); an unfinished
    one (a requeued or re-run job) is continued unless `reuse` is `never`, with `hint` saying how to continue it."""
    if not (path / "run.json").exists():
        return
    started = json.loads((path / "run.json").read_text()).get("started", "?")
    if is_complete(path):
        raise ConfigError(
            f"{path} already holds a complete {stage} run (started {started}), and a finished run is "
            "never rewritten: choose another run_id, or leave it unset for a new one"
        )
    if reuse == "never":
        raise ConfigError(
            f"{path} already holds a started {stage} run (started {started}): choose another run_id, "
            f"or leave it unset for a new one{hint}"
        )


def start_run(
    cfg: Config, stage: str, rank: int = 0, reuse: Literal["never", "unfinished"] = "unfinished", hint: str = ""
) -> Path:
    """Create the run directory (check_reuse first); rank 0 records the resolved config and how it was started."""
    path = run_dir(cfg, stage)
    if rank == 0:
        check_reuse(path, stage, reuse, hint)
    path.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write_text(path / "config.yaml", dump_config(cfg))
        atomic_write_json(
            path / "run.json",
            {
                "stage": stage,
                "run_id": cfg.run_id,
                "argv": sys.argv,
                "cwd": os.getcwd(),
                "host": platform.node(),
                "python": sys.version.split()[0],
                "started": time.strftime("%FT%T%z"),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            },
        )
    return path


def mark_complete(path: Path, result: dict) -> None:
    atomic_write_json(path / COMPLETE, {"finished": time.strftime("%FT%T%z"), **result})


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).exists()


def read_result(path: Path) -> dict:
    return json.loads((path / COMPLETE).read_text())


def latest_complete(cfg: Config, stage: str) -> Path:
    root = stage_root(cfg, stage)
    runs = [p for p in root.glob("*") if is_complete(p)] if root.exists() else []
    if not runs:
        raise FileNotFoundError(
            f"no complete `{stage}` run under {root}: run "
            f"`python launch/submit.py {stage} --config ...` first, or give a path"
        )
    # Prefer the run that shares this run's id (a chained pipeline), else the newest.
    same = [p for p in runs if p.name == cfg.run_id]
    return same[0] if same else max(runs, key=lambda p: (p / COMPLETE).stat().st_mtime)


def resolve(cfg: Config, ref: str, stage: str) -> Path:
    """`latest` -> newest complete run of `stage`; anything else is a path that must exist."""
    if ref == "latest":
        return latest_complete(cfg, stage)
    path = Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a `{stage}` output or `latest`)")
    return path
