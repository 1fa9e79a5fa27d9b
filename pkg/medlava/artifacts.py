"""What a directory medlava writes holds, and how it comes to exist whole.

Invariants:
- A checkpoint directory is one that holds MANIFEST (`medlava.json`); its `kind` says what else it holds.
- A directory written through `atomic_dir`/`publish` exists under its final name only once it is whole: it is
  built under a hidden temp name beside it and renamed into place (one rename; atomic on POSIX file systems).
- A run directory names its checkpoint in COMPLETE.json (`runs.read_result(run)["checkpoint"]`).
No model code here: readers of checkpoints (models/, tools/) and writers (train/, data/) build on it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from medlava.io import atomic_write_json
from medlava.runs import is_complete, read_result

MANIFEST = "medlava.json"
Kind = Literal["projector", "lora", "full", "cnn", "clip"]
"""projector: the aligned projector's weights; lora: a peft adapter (+ projector as modules_to_save); full: a whole
transformers LLaVA; cnn: a timm classifier (models/cnn.py); clip: an open_clip model in its local-dir layout."""
KINDS: tuple[str, ...] = Kind.__args__
Exists = Literal["replace", "keep", "refuse"]
"""When the final directory already exists: replace it (a re-run of the same checkpoint after a crash between its
rename and what followed), keep it (a cache another process finished first: ours is dropped), or refuse."""


def write_manifest(folder: Path, kind: Kind, **fields: object) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {', '.join(KINDS)}")
    atomic_write_json(Path(folder) / MANIFEST, {"kind": kind, **fields})


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{ckpt} is not a medlava checkpoint (no {MANIFEST}); pass a checkpoint "
            "directory written by a training stage (checkpoints/step-N) or its complete run"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("kind") not in KINDS:
        raise ValueError(f"{path}: unknown checkpoint kind {manifest.get('kind')!r}; one of {', '.join(KINDS)}")
    return manifest


def step_of(checkpoint: str | Path) -> int:
    """The step a checkpoint was saved at, from its directory name (`step-N`, `epoch-N`, `epoch-N-step-S`); 0 for
    `base` or a directory named otherwise (a converted model), the untrained end of a curve."""
    m = re.search(r"step-(\d+)$", str(checkpoint)) or re.search(r"epoch-(\d+)$", str(checkpoint))
    return int(m.group(1)) if m else 0


def checkpoint_of(path: Path) -> Path:
    """A checkpoint directory from either itself or a complete training run directory."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if is_complete(path) and "checkpoint" in read_result(path):
        return path / read_result(path)["checkpoint"]  # stored relative to the run
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a complete training run")


def temp_path(dst: Path, unique: bool = False) -> Path:
    """The hidden name `dst` is built under. By default derived from `dst` alone, so every rank of a job finds the
    same one and a killed writer's leftovers are reclaimed by the next; `unique`: a name of this call's own, for
    caches that several processes may fill at once."""
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp" if unique else f".{dst.name}.tmp")


def temp_dir_for(dst: Path, unique: bool = False) -> Path:
    """temp_path(dst, unique), created empty."""
    tmp = temp_path(dst, unique)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, dst: Path, exists: Exists = "refuse") -> Path:
    """Rename the whole `tmp` into place as `dst` (see Exists)."""
    dst = Path(dst)
    if dst.exists() and exists == "replace":
        shutil.rmtree(dst)
    try:
        os.replace(tmp, dst)  # atomic; replaces an empty directory, fails on a full one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dst.is_dir():
            raise
        if exists == "keep":  # another process finished the same directory first
            return dst
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination") from None
    return dst


@contextmanager
def atomic_dir(dst: Path, exists: Exists = "refuse") -> Iterator[Path]:
    """Yield an empty temp directory beside `dst`; it becomes `dst` only when the block finishes."""
    dst = Path(dst)
    if dst.exists() and exists == "refuse":  # checked first: what fills the directory may take long
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    tmp = temp_dir_for(dst, unique=exists == "keep")
    try:
        yield tmp
        publish(tmp, dst, exists)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
