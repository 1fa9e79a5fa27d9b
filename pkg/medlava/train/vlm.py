"""What `align` and `sft` share: build the model, choose what trains, hand it to the loop.

align: projector only on the `plain` template (LLaVA's tune_mm_mlp_adapter).
sft:   LoRA on the language model (peft), or a full fine-tune; projector and vision tower switchable.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from medlava import signals
from medlava.config import Config, TrainConfig
from medlava.data.samples import load_prepared, split_file
from medlava.distributed import Dist, barrier
from medlava.io import atomic_write_json, file_sha256
from medlava.models.inputs import Encoder, SampleDataset
from medlava.models.kernels import apply_liger, compile_blocks
from medlava.models.llava import (
    PROJECTOR,
    PROJECTOR_FILE,
    base_model_path,
    choose_attention,
    load_model,
    load_processor,
    load_projector,
    num_image_tokens,
    varlen,
)
from medlava.precision import choose_dtype
from medlava.train import runtime
from medlava.train.checkpoint import Checkpointer
from medlava.train.loop import Schedule, resume_and_train
from medlava.train.validation import Validation
from medlava.train.vlm_trainer import VlmTrainer

log = logging.getLogger(__name__)


def set_trainable(model: torch.nn.Module, vision: bool, projector: bool, llm: bool) -> None:
    for name, p in model.named_parameters():
        if "vision_tower" in name:
            p.requires_grad = vision
        elif PROJECTOR in name:
            p.requires_grad = projector
        else:  # language model, embeddings and lm_head
            p.requires_grad = llm


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():  # ds_numel: the full size of a ZeRO-3 sharded parameter
        counts["trainable" if p.requires_grad else "frozen"] += getattr(p, "ds_numel", p.numel())
    return counts


def _gathered_for_write(module: torch.nn.Module, t: TrainConfig):
    """ZeRO-3 loads weights sharded; writing into them needs them gathered (rank 0's copy wins)."""
    if not t.deepspeed.startswith("zero3"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def _lora(model: torch.nn.Module, t: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # LoRA on the language model only: CLIP's attention layers share the projection names.
    target = rf"^model\.language_model\..*\.({'|'.join(t.lora.target_modules)})$"
    keep = [m for m, on in ((PROJECTOR, t.train_projector), ("vision_tower", t.train_vision)) if on]
    config = LoraConfig(
        r=t.lora.r,
        lora_alpha=t.lora.alpha,
        lora_dropout=t.lora.dropout,
        target_modules=target,
        modules_to_save=keep or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@dataclass
class StageModel:
    """The model a training stage trains, with what it was built from."""

    model: torch.nn.Module
    processor: object
    template: str
    kind: str  # projector | lora | full: what its checkpoints hold
    dtype: torch.dtype
    base: str
    attention: str | dict[str, str]
    speedups: dict  # kernels, compiled blocks: what train_info.json records
    zero3_config: object = None  # HfDeepSpeedConfig: transformers reads it through a weakref while it lives


def build_model(cfg: Config, stage: str, dist: Dist, init: Path | None) -> StageModel:
    """Load the base model and choose what trains, as `stage` does (check-model builds it this way too)."""
    t: TrainConfig = getattr(cfg, stage)  # align and sft are configured by the sections of their names
    m = cfg.vlm(stage)
    dtype = choose_dtype(t.precision)
    base = base_model_path(m)
    zero3 = None
    if t.deepspeed.startswith("zero3"):  # shard while loading (zero.Init): a 7B never sits whole on one rank
        from transformers.integrations import HfDeepSpeedConfig

        from medlava.distributed import ensure_process_group
        from medlava.train.deepspeed import deepspeed_config

        ensure_process_group(dist)
        zero3 = HfDeepSpeedConfig(deepspeed_config(t, dtype))
    attention = choose_attention(m.attn_implementation, t.packing)
    model, processor = load_model(base, m, dtype, attention), load_processor(base, m)
    speedups = {"kernels": apply_liger(model, stage) if t.kernels == "liger" else "none"}

    torch.manual_seed(t.seed)  # LoRA's random init must be the same on every rank and every run of a seed
    if stage == "align":
        set_trainable(model, vision=False, projector=True, llm=False)
        template, kind = "plain", "projector"
    else:
        if init is not None:
            with _gathered_for_write(model.get_submodule(f"model.{PROJECTOR}"), t):
                load_projector(model, init / PROJECTOR_FILE)
        set_trainable(model, vision=t.train_vision, projector=t.train_projector, llm=t.train_llm)
        if t.lora:
            model = _lora(model, t)
        template, kind = m.template, "lora" if t.lora else "full"
    speedups["compiled_blocks"] = compile_blocks(model) if t.compile else 0
    return StageModel(model, processor, template, kind, dtype, base, attention, speedups, zero3)


def weight_settings(cfg: Config, stage: str, prepared: Path, init: Path | None, world_size: int) -> dict:
    """What decides the weights `stage` (align or sft) trains (runtime.weight_settings): its section, with the
    samples per step over all ranks in place of grad_accum (which a resume on another number of processes changes to
    keep them), the model, the training split's digest and the projector it starts from."""
    t: TrainConfig = getattr(cfg, stage)
    model = runtime.flatten("model", cfg.vlm(stage).model_dump(mode="json"))
    start = {
        f"{stage}.init_from": str(init.resolve()) if init else None,
        f"{stage}.global_batch_size": t.batch_size * t.grad_accum * world_size,
    }
    return runtime.weight_settings(
        stage,
        t,
        ("init_from", "grad_accum", "global_batch_size"),
        **model,
        **start,
        **{"data.train": file_sha256(split_file(prepared, "train"))},
    )


def train_vlm(
    cfg: Config, stage: str, dist: Dist, run: Path, prepared: Path, init: Path | None, settings: dict
) -> tuple[Path, dict]:
    """Train what `stage` (align or sft) trains on the prepared training split, checkpoints under `run` recording
    `settings` (weight_settings); starts from the projector checkpoint `init` when given. (final checkpoint, what
    train_info.json records)."""
    t: TrainConfig = getattr(cfg, stage)  # align and sft are configured by the sections of their names
    m = cfg.vlm(stage)
    signals.install()  # a stop requested while the model loads is answered at the first step
    samples, manifest = load_prepared(prepared, "train")
    checkpointer = Checkpointer(run, dist, t.keep_last, settings=settings)  # the stage ran check_resume before this
    if dist.main:  # the tiny preset writes its checkpoint on first use: once, before the other ranks read it
        base_model_path(m)
    barrier()
    built = build_model(cfg, stage, dist, init)
    model, processor, template, dtype = built.model, built.processor, built.template, built.dtype

    if t.packing and not varlen(built.attention):
        log.warning(
            "%s.packing with %s attention: the packed row is attended through a dense block-diagonal mask, "
            "slower than padding (bench/train.py); on a GPU model.attn_implementation=auto attends it "
            "sample by sample",
            stage,
            built.attention,
        )
    counts = count_parameters(model)
    info = {
        "attention": built.attention,
        "dtype": str(dtype),
        "template": template,
        "world_size": dist.world_size,
        "device": str(dist.device),
        "samples": len(samples),
        "parameters": counts,
        "prepared": str(prepared),
        "init_from": str(init) if init else None,
        **built.speedups,
        "optimizer": "deepspeed AdamW" if t.deepspeed != "none" else "torch AdamW (fused)",
    }
    if dist.main:
        atomic_write_json(run / "train_info.json", info)
    log.info(
        "%s: %d samples, %s trainable of %s parameters, attention=%s",
        stage,
        len(samples),
        f"{counts['trainable']:,}",
        f"{counts['trainable'] + counts['frozen']:,}",
        info["attention"],
    )

    encoder = Encoder(processor, template, num_image_tokens(model), m.model_max_length, Path(manifest["image_root"]))
    trainer = VlmTrainer(
        model,
        processor,
        SampleDataset(samples, encoder),
        t,
        dist,
        dtype,
        built.kind,
        {"base_model": built.base, "stage": stage, "template": template},
        checkpointer,
    )
    torch.manual_seed(t.seed + dist.rank)
    validation = validation_of(prepared, encoder, t, stage, template)
    validate = (lambda: validation.measure(trainer.engine or model, dist, trainer.amp)) if validation else None
    ckpt = resume_and_train(
        trainer,
        checkpointer,
        t.resume == "auto",
        t.seed,
        Schedule(
            trainer.total,
            t.save_every,
            t.log_every,
            run.parent.name,
            f"{stage}.lr (now {t.lr:g})",
            t.eval_every,
            validate,
        ),
        run,
        dist,
    )
    return ckpt, info


def validation_of(prepared: Path, encoder: Encoder, t: TrainConfig, stage: str, template: str) -> Validation | None:
    """What `<stage>.eval_every` validates on: the prepared val split (None when off, or when the split is empty)."""
    if t.eval_every is None:
        return None
    samples, _ = load_prepared(prepared, "val")
    if not samples:
        log.warning("%s.eval_every=%d, but %s has no validation samples: no validation", stage, t.eval_every, prepared)
        return None
    return Validation.of(samples, encoder, t, template)
