"""Checkpoints: what later stages load (projector / LoRA adapter / full model + processor + manifest) and
what resume needs (trainable weights, optimizer, scheduler, RNG, data position).

A checkpoint is written into a hidden temp directory and renamed into place, so a directory named
`step-N` is always complete; resume takes the newest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medlava.models.llava import MANIFEST, PROJECTOR_FILE, save_projector
from medlava.runs import is_complete, read_result

TRAINABLE = "trainable.safetensors"
STATE = "trainer_state.pt"


def checkpoint_dirs(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.exists() else []


def save_checkpoint(run: Path, step: int, model: torch.nn.Module, processor, kind: str, manifest: dict,
                    optimizer: torch.optim.Optimizer, scheduler, extra: dict) -> Path:
    """Write checkpoints/step-N atomically. `model` is unwrapped (no DDP); rank 0 only."""
    final = run / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if kind == "projector":
        save_projector(model, tmp / PROJECTOR_FILE)
    elif kind == "lora":
        model.save_pretrained(tmp)  # adapter + modules_to_save (the projector)
    else:
        model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(tmp / TRAINABLE))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                **extra}, tmp / STATE)
    (tmp / MANIFEST).write_text(json.dumps({"kind": kind, "step": step, **manifest}, indent=2))
    if final.exists():  # a re-run of the same step after a crash between rename and COMPLETE
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_resume_state(ckpt: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    weights = load_file(str(ckpt / TRAINABLE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"{ckpt}: cannot resume, trainable weights missing ({missing[:3]}...): "
                           "was the run restarted with a different train.* config?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state


def checkpoint_of(path: Path) -> Path:
    """A checkpoint directory from either itself or a complete training run directory."""
    if (path / MANIFEST).exists():
        return path
    if is_complete(path) and "checkpoint" in read_result(path):
        return path / read_result(path)["checkpoint"]  # stored relative to the run
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a complete training run")
