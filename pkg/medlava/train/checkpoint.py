"""Checkpoints: what later stages load (projector / LoRA adapter / full model + processor + manifest) and
what resume needs (trainable weights, optimizer, scheduler, RNG, data position).

A checkpoint is written into a hidden temp directory and renamed into place, so a directory named
`step-N` is always complete; resume takes the newest one.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medlava.artifacts import publish, temp_dir_for, temp_path, write_manifest
from medlava.distributed import Dist, barrier
from medlava.models.llava import PROJECTOR_FILE, save_projector
from medlava.train.runtime import STATE

TRAINABLE = "trainable.safetensors"


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _gathered(model: torch.nn.Module, engine):
    """Under ZeRO-3 parameters are sharded: gather the trainable ones (all of them for a full
    fine-tune) for the duration of the save."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return nullcontext()
    import deepspeed
    params = [p for p in model.parameters() if p.requires_grad] if any(
        not p.requires_grad for p in model.parameters()) else list(model.parameters())
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_checkpoint(run: Path, step: int, model: torch.nn.Module, processor, kind: str, manifest: dict,
                    optimizer, scheduler, extra: dict, d: Dist, engine=None) -> Path:
    """Write checkpoints/step-N atomically; every rank calls it (each saves its RNG, and under DeepSpeed
    its optimizer shard). `model` is unwrapped (no DDP / engine)."""
    final = run / "checkpoints" / f"step-{step:06d}"
    tmp = temp_path(final)  # the same name on every rank: each writes its files into it
    if d.main:
        temp_dir_for(final)
    barrier()
    torch.save(_rng_state(), tmp / f"rng-{d.rank}.pt")
    if engine is not None:  # optimizer, scheduler and trainable weights, sharded as they are in memory
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    with _gathered(model, engine):
        if d.main:
            if kind == "projector":
                save_projector(model, tmp / PROJECTOR_FILE)
            else:  # lora: adapter + modules_to_save (the projector); full: the whole model
                model.save_pretrained(tmp)
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(tmp / TRAINABLE))
    if d.main:
        processor.save_pretrained(tmp)
        state = {"step": step, **extra}
        if engine is None:
            state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        torch.save(state, tmp / STATE)
        write_manifest(tmp, kind, step=step, **manifest)
    barrier()  # every rank's RNG file is in tmp before it becomes step-N: renamed earlier, a slow rank's is lost
    if d.main:  # a re-run of the same step after a crash between rename and COMPLETE replaces it
        publish(tmp, final, exists="replace")
    barrier()
    return final


def load_resume_state(ckpt: Path, model: torch.nn.Module, optimizer, scheduler, d: Dist, engine=None) -> dict:
    if engine is not None:
        engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    else:
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
    if engine is None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt / f"rng-{d.rank}.pt"
    if not rng_file.exists():
        raise RuntimeError(f"{ckpt} was saved with fewer processes (no {rng_file.name}); resume with the same "
                           "number of nodes and GPUs, or start a new run_id")
    rng = torch.load(rng_file, weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return state
