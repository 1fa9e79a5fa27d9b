"""align/sft as a task of the step loop: AdamW with a separate projector learning rate (or DeepSpeed ZeRO), a cosine
schedule with warm-up, gradient accumulation and clipping, mixed precision, DDP, and checkpoints of what trains
that resume exactly (weights, optimizer, scheduler, RNG, data position)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from medlava import precision
from medlava.config import TrainConfig
from medlava.distributed import Dist, ensure_process_group
from medlava.models.inputs import SampleDataset, collate, collate_packed, raise_batch_error
from medlava.models.llava import PROJECTOR_FILE, enable_activation_checkpointing, save_projector
from medlava.train import runtime
from medlava.train.checkpoint import Checkpointer
from medlava.train.loop import Position, StepMetrics
from medlava.train.optim import make_optimizer, param_groups
from medlava.train.sampling import epoch_indices

TRAINABLE = "trainable.safetensors"
"""The trainable weights of a projector or LoRA checkpoint, by parameter name (what resume reads). A full
fine-tune's are its model files: written once."""


def _gathered(model: torch.nn.Module, engine):
    """Under ZeRO-3 parameters are sharded: gather the trainable ones (all of them for a full fine-tune) for the
    duration of the save."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return nullcontext()
    import deepspeed

    params = (
        [p for p in model.parameters() if p.requires_grad]
        if any(not p.requires_grad for p in model.parameters())
        else list(model.parameters())
    )
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def saved_model_weights(ckpt: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of the transformers model files in `ckpt` (one file or an index of shards)."""
    index = ckpt / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(str(ckpt / name), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys() if k in names}
    return out


class VlmTrainer:
    """What the VLM step loop holds: the model (unwrapped), what steps it (DDP or a DeepSpeed engine), the optimizer
    and schedule, and how a checkpoint of it is written and read."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        dataset: SampleDataset,
        t: TrainConfig,
        dist: Dist,
        dtype: torch.dtype,
        kind: str,
        manifest: dict,
        checkpointer: Checkpointer,
    ):
        self.model, self.processor, self.dataset, self.t, self.dist = model, processor, dataset, t, dist
        self.kind, self.manifest, self.checkpointer = kind, manifest, checkpointer
        micro_per_epoch = math.ceil(math.ceil(len(dataset) / dist.world_size) / t.batch_size)
        if micro_per_epoch < t.grad_accum:
            raise ValueError(
                f"{len(dataset)} samples make {micro_per_epoch} micro-batches per rank, fewer than "
                f"grad_accum={t.grad_accum}: lower batch_size or grad_accum"
            )
        self.steps_per_epoch = micro_per_epoch // t.grad_accum  # a trailing partial window is dropped, as drop_last
        self.total = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        warmup = math.ceil(self.total * t.warmup_ratio)
        self.collate = (
            collate_packed if t.packing else partial(collate, pad_id=processor.tokenizer.pad_token_id, side="right")
        )
        if t.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.engine = None
        if t.deepspeed != "none":
            import deepspeed

            from medlava.train.deepspeed import deepspeed_config

            ensure_process_group(dist)
            # DeepSpeed owns mixed precision, accumulation, clipping, the optimizer and the scheduler step.
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                model_parameters=param_groups(model, t.lr, t.weight_decay, t.projector_lr),
                config=deepspeed_config(t, dtype),
                lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, self.total),
            )
            self.net, self.amp = self.engine, None
        else:
            # Mixed precision keeps fp32 master copies of what trains; frozen weights stay in `dtype`.
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            model.to(dist.device)
            self.optimizer = make_optimizer(model, t.lr, t.weight_decay, t.projector_lr)
            self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total)
            self.net, self.amp = runtime.wrap_ddp(model, dist), precision.autocast_dtype(dtype, dist.device)
        self.scaler = precision.grad_scaler(self.amp)

    def batches(self, epoch: int, skip: int) -> Iterator:
        t = self.t
        self.net.train()
        indices = epoch_indices(
            len(self.dataset),
            t.seed,
            epoch,
            self.dist,
            skip * t.grad_accum * t.batch_size,
            t.batch_size,
            self.dataset.lengths() if t.group_by_length else None,
        )
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_size=t.batch_size,
                sampler=indices,
                num_workers=t.num_workers,
                collate_fn=self.collate,
                pin_memory=self.dist.device.type == "cuda",
            )
        )

    def step(self, batches: Iterator, pos: Position) -> StepMetrics:
        """One update over grad_accum micro-batches."""
        t, dist = self.t, self.dist
        tic, losses, tokens, slots, samples, waited = time.perf_counter(), [], 0, 0, 0, 0.0
        for k in range(t.grad_accum):
            wait = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - wait
            raise_batch_error(batch)
            batch = {key: v.to(dist.device, non_blocking=True) for key, v in batch.items()}
            samples += int((batch["position_ids"] == 0).sum()) if t.packing else len(batch["input_ids"])
            real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            tokens, slots = tokens + real, slots + batch["input_ids"].numel()
            sync = k == t.grad_accum - 1 or not isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
            if self.engine is not None:
                loss = self.engine(**batch, use_cache=False).loss
                self.engine.backward(loss)
                self.engine.step()  # steps optimizer and scheduler only at the accumulation boundary
            else:
                with nullcontext() if sync else self.net.no_sync(), precision.autocast(dist.device, self.amp):
                    loss = self.net(**batch, use_cache=False).loss
                    self.scaler.scale(loss / t.grad_accum).backward()
            losses.append(loss.item())
        if self.engine is not None:
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        else:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm).item()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return StepMetrics(
            loss=sum(losses) / len(losses),
            samples=samples,
            seconds=time.perf_counter() - tic,
            waited=waited,
            tokens=tokens,
            grad_norm=grad_norm,
            extra={"pad_fraction": 1 - tokens / slots},
        )

    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def end_epoch(self, pos: Position, losses: list[float], writer) -> None:
        return None

    def _write(self, tmp: Path) -> None:
        model = self.model
        with _gathered(model, self.engine):
            if self.dist.main:
                if self.kind == "projector":
                    save_projector(model, tmp / PROJECTOR_FILE)
                elif self.kind == "lora":  # the adapter + modules_to_save (the projector)
                    model.save_pretrained(tmp)
                else:  # full: the model files, by the parameters' own names (what resume reads back)
                    model.save_pretrained(tmp, save_original_format=False)
                if self.kind != "full":
                    save_file(
                        {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                        str(tmp / TRAINABLE),
                    )
        if self.dist.main:
            self.processor.save_pretrained(tmp)

    def save(self, pos: Position) -> Path:
        state = {"position": pos.state(), "total": self.total}
        if self.engine is None:
            state |= {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return self.checkpointer.save(
            f"step-{pos.step:06d}", self.kind, {"step": pos.step, **self.manifest}, state, self._write, self.engine
        )

    def restore(self, ckpt: Path, state: dict) -> Position:
        """The trainable weights, optimizer and schedule of `ckpt`; where the loop was."""
        if self.engine is not None:
            self.engine.load_checkpoint(
                str(ckpt / "deepspeed"),
                tag="state",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            return Position(**state["position"])
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        weights = (
            saved_model_weights(ckpt, set(params))
            if self.kind == "full"
            else {k: v for k, v in load_file(str(ckpt / TRAINABLE)).items() if k in params}
        )
        missing = sorted(set(params) - set(weights))
        if missing:
            raise RuntimeError(
                f"{ckpt}: cannot resume, trainable weights missing ({missing[:3]}...): was the run "
                "restarted with other train_* / lora settings? Restore them, or start a new run_id"
            )
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return Position(**state["position"])
