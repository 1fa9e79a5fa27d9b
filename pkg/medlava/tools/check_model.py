"""`medlava check-model`: load the model exactly as the align/sft stage would, and show what the job will do
before it waits in a queue: architecture, attention, dtype, trainable/frozen parameters per group, a memory
estimate per GPU, one sample through the chat template (image-token span, loss-carrying tokens), the loss on it,
and one greedy generation on its image. Any step that fails ends it with the reason and a non-zero exit.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from pydantic import ValidationError

from medlava.config import (
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    format_errors,
    load_config,
)
from medlava.data.samples import load_prepared
from medlava.distributed import Dist
from medlava.infer.score import generate
from medlava.io import InputError
from medlava.models.inputs import Encoder, collate
from medlava.models.llava import PROJECTOR, choose_attention, num_image_tokens
from medlava.models.templates import IGNORE_INDEX
from medlava.runs import resolve
from medlava.stages.sft import init_checkpoint
from medlava.train.vlm import build_model

GROUPS = ("vision tower", "projector", "LLM", "LoRA")
GiB = 1024**3
MAX_NEW_TOKENS = 16
SAMPLE_QUESTION = "<image>\nWhat is shown in this image?"
SAMPLE_ANSWER = "A test pattern."


class StepFailed(RuntimeError):
    def __init__(self, step: str, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step = step


@dataclass
class Built:
    model: torch.nn.Module
    processor: object
    template: str
    dtype: torch.dtype
    base: str
    notes: list[str] = field(default_factory=list)


def build_for_stage(cfg: Config, stage: str) -> Built:
    """The model of `stage`, built by the stage's own build_model in one process (ZeRO-3's sharded
    loading aside: the memory estimate accounts for it)."""
    notes = []
    try:
        init = init_checkpoint(cfg) if stage == "sft" else None
    except FileNotFoundError as e:  # normal before the chain has run; the sft job itself would stop here
        init = None
        notes.append(f"sft.init_from={cfg.sft.init_from}: {e}; sft fails unless that exists by the time it starts")
    if init is not None:
        notes.append(f"projector loaded from {init}")
    # Built plainly: one process, no fused kernels or compiled blocks (align and sft: sections of their names).
    plain = getattr(cfg, stage).model_copy(update={"deepspeed": "none", "kernels": "none", "compile": False})
    built = build_model(cfg.model_copy(update={stage: plain}), stage, Dist(0, 1, 0, torch.device("cpu")), init)
    return Built(built.model, built.processor, built.template, built.dtype, built.base, notes)


def group_of(name: str) -> str:
    if "lora_" in name:
        return "LoRA"
    if "vision_tower" in name:
        return "vision tower"
    return "projector" if PROJECTOR in name else "LLM"


def count_groups(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """{group: {trainable, frozen}}; peft's frozen original of a `modules_to_save` copy counts as frozen."""
    counts = {g: {"trainable": 0, "frozen": 0} for g in GROUPS}
    for name, p in model.named_parameters():
        counts[group_of(name)]["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


@dataclass
class Memory:
    """Bytes per GPU process. Formula (rough, before CUDA context and fragmentation, ~1-2 GiB more):
    plain DDP (medlava's loop): trainable weights as fp32 master copies (4 B) + fp32 grads (4) + AdamW m, v (8);
      frozen weights in the load dtype; nothing sharded.
    DeepSpeed ZeRO (mixed precision, the ZeRO paper's 2 + 2 + 12 bytes per trainable parameter): half weights
      and grads, fp32 master + m + v; ZeRO-2 shards grads and optimizer over the GPUs, ZeRO-3 also every weight,
      zero3_offload keeps weights and optimizer in CPU memory (`cpu`).
    Activations per micro-batch of `batch` x `seq` tokens: 34·s·b·h bytes (half precision) per decoder layer
      (Korthikanti et al. 2022; no s² term: SDPA/flash-attn keep no score matrix), or with gradient checkpointing
      the layer inputs s·b·h per layer plus one layer's 34·s·b·h; plus fp32 logits and their gradient, 2·s·b·V·4.
    """

    setup: str
    gpus: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def estimate_memory(
    trainable: int,
    frozen: int,
    dtype: torch.dtype,
    deepspeed: str,
    gpus: int,
    hidden: int,
    layers: int,
    vocab: int,
    batch: int,
    seq: int,
    checkpointing: bool,
) -> Memory:
    half = dtype in (torch.bfloat16, torch.float16)
    w = 2 if half else 4
    cpu = 0.0
    if deepspeed == "none":
        weights, grads, optimizer, setup = frozen * w + trainable * 4.0, trainable * 4.0, trainable * 8.0, "plain DDP"
    else:
        weights, grads = (frozen + trainable) * float(w), trainable * float(w)
        optimizer = trainable * (12.0 if half else 8.0)
        grads, optimizer = grads / gpus, optimizer / gpus
        if deepspeed.startswith("zero3"):
            weights /= gpus
        if deepspeed == "zero3_offload":
            cpu, weights, optimizer = weights + optimizer, 0.0, 0.0
        setup = {
            "zero2": "DeepSpeed ZeRO-2",
            "zero3": "DeepSpeed ZeRO-3",
            "zero3_offload": "DeepSpeed ZeRO-3 + CPU offload",
        }[deepspeed]
    sbh = seq * batch * hidden
    layer = 34 * sbh * w / 2
    acts = (layers * sbh * w + layer) if checkpointing else layers * layer
    acts += 2 * seq * batch * vocab * 4
    return Memory(setup, gpus, weights, grads, optimizer, acts, cpu)


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _ranges(positions: list[int]) -> list[tuple[int, int]]:
    runs = []
    for _, grp in itertools.groupby(enumerate(positions), key=lambda x: x[1] - x[0]):
        block = [p for _, p in grp]
        runs.append((block[0], block[-1]))
    return runs


def format_ranges(positions: list[int]) -> str:
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in _ranges(positions)) or "none"


def marked_text(ids: list[int], labels: list[int], image_id: int, tokenizer) -> str:
    """The rendered sample: the image span as <image×N>, loss-carrying tokens inside ⟦ ⟧."""
    out = []
    kinds = [
        "image" if t == image_id else "loss" if y != IGNORE_INDEX else "prompt"
        for t, y in zip(ids, labels, strict=True)
    ]
    pos = 0
    for kind, grp in itertools.groupby(kinds):
        n = len(list(grp))
        piece = ids[pos : pos + n]
        pos += n
        if kind == "image":
            out.append(f"<image×{n}>")
        else:
            text = tokenizer.decode(piece, skip_special_tokens=False).replace("\n", "\\n")
            out.append(f"⟦{text}⟧" if kind == "loss" else text)
    return "".join(out)


def builtin_sample(folder: Path) -> tuple[dict, Path]:
    """A non-square test image (so `pad` vs `crop` shows) and a one-turn conversation."""
    image = Image.new("RGB", (48, 32))
    image.putdata([(x * 5, y * 7, 128) for y in range(32) for x in range(48)])
    image.save(folder / "check.png")
    turns = [{"from": "human", "value": SAMPLE_QUESTION}, {"from": "gpt", "value": SAMPLE_ANSWER}]
    return {"id": "check-model", "image": "check.png", "conversations": turns}, folder


def pick_sample(cfg: Config, tmp: Path) -> tuple[dict, Path, str]:
    """(sample, image root, where from): the first training sample of the prepared data, else a built-in one."""
    try:
        prepared = resolve(cfg, cfg.data.samples, "prepare")
        samples, manifest = load_prepared(prepared, "train")
    except FileNotFoundError:
        sample, root = builtin_sample(tmp)
        return sample, root, "built-in test sample (no prepared data found)"
    return samples[0], Path(manifest["image_root"]), f"first train sample of {prepared}"


@dataclass
class Report:
    """What check-model found; printed line by line and returned for tests."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)
    loss_positions: list[int] = field(default_factory=list)
    loss: float = math.nan
    generated: str = ""


def _step(name: str, fn: Callable):
    try:
        return fn()
    except (InputError, ValueError, RuntimeError, OSError) as e:  # a user-facing reason for each step
        raise StepFailed(name, f"{type(e).__name__}: {e}") from e


def check_model(cfg: Config, stage: str, out: Callable[[str], None] = print) -> Report:
    rep = Report()
    t: TrainConfig = cfg.align if stage == "align" else cfg.sft
    vlm = cfg.vlm(stage)

    def line(key: str, text: str) -> None:
        out(f"{key:<11}{text}")

    b = _step("load", lambda: build_for_stage(cfg, stage))
    base_model = b.model.get_base_model() if hasattr(b.model, "get_base_model") else b.model
    c = base_model.config
    tc, vc = c.text_config, c.vision_config
    line("model", f"{b.base}")
    line(
        "",
        f"{type(base_model).__name__}: {vc.model_type} {vc.num_hidden_layers}×{vc.hidden_size} "
        f"({vc.image_size}px, patch {vc.patch_size}, feature layer {c.vision_feature_layer}) → projector "
        f"{c.projector_hidden_act} → {tc.model_type} {tc.num_hidden_layers}×{tc.hidden_size}, vocab {tc.vocab_size}",
    )
    line(
        "attention",
        f"{c._attn_implementation} (model.attn_implementation={vlm.attn_implementation} → "
        f"{choose_attention(vlm.attn_implementation)})",
    )
    line(
        "dtype",
        f"{next(base_model.parameters()).dtype} (precision={t.precision}); stage {stage}, template {b.template}",
    )
    for note in b.notes:
        line("note", note)

    rep.counts = count_groups(b.model)
    line("parameters", f"{'':<13}{'trainable':>14}{'frozen':>16}")
    for g in GROUPS:
        line("", f"{g:<13}{rep.counts[g]['trainable']:>14,}{rep.counts[g]['frozen']:>16,}")
    trainable = sum(v["trainable"] for v in rep.counts.values())
    frozen = sum(v["frozen"] for v in rep.counts.values())
    line("", f"{'total':<13}{trainable:>14,}{frozen:>16,}")
    if trainable == 0:
        raise StepFailed("parameters", "nothing is trainable; check sft.train_* and sft.lora")

    gpus = cfg.cluster.nodes * max(1, cfg.cluster.gpus_per_node)
    chosen = t.deepspeed
    for setup in dict.fromkeys([chosen, "none", "zero2", "zero3", "zero3_offload"]):
        rep.memory[setup] = estimate_memory(
            trainable,
            frozen,
            b.dtype,
            setup,
            gpus,
            tc.hidden_size,
            tc.num_hidden_layers,
            tc.vocab_size,
            t.batch_size,
            vlm.model_max_length,
            t.gradient_checkpointing,
        )
    m = rep.memory[chosen]
    line(
        "memory/GPU",
        f"{size(m.total)} with {m.setup} on {gpus} GPU(s), micro-batch {t.batch_size} × "
        f"{vlm.model_max_length} tokens, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
    )
    line(
        "",
        f"= weights {size(m.weights)} + grads {size(m.grads)} + optimizer {size(m.optimizer)} + activations "
        f"{size(m.activations)}" + (f"; {size(m.cpu)} in CPU memory" if m.cpu else ""),
    )
    line("", "others: " + ", ".join(f"sft.deepspeed={k} {size(v.total)}" for k, v in rep.memory.items() if k != chosen))

    with tempfile.TemporaryDirectory() as tmp:
        sample, image_root, source = _step("sample", lambda: pick_sample(cfg, Path(tmp)))
        encoder = Encoder(b.processor, b.template, num_image_tokens(base_model), vlm.model_max_length, image_root)
        tok = b.processor.tokenizer
        batch = _step("sample", lambda: collate([encoder.train_item(sample)], tok.pad_token_id, "right"))
        prompt = _step("sample", lambda: encoder.prompt_item(sample))
    rep.input_ids = batch["input_ids"][0].tolist()
    rep.labels = batch["labels"][0].tolist()
    rep.image_positions = [i for i, x in enumerate(rep.input_ids) if x == encoder.image_token_id]
    rep.loss_positions = [i for i, x in enumerate(rep.labels) if x != IGNORE_INDEX]
    line("sample", f"{sample['id']}: {source}")
    line(
        "",
        f"{len(rep.input_ids)} tokens; image tokens at {format_ranges(rep.image_positions)} "
        f"({len(rep.image_positions)}); loss on {format_ranges(rep.loss_positions)} ({len(rep.loss_positions)})",
    )
    line("", marked_text(rep.input_ids, rep.labels, encoder.image_token_id, tok))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = b.model.to(device).eval()
    amp = device.type == "cuda" and b.dtype != torch.float32
    with torch.no_grad(), torch.autocast(device.type, dtype=b.dtype, enabled=amp):
        outputs = _step("loss", lambda: model(**{k: v.to(device) for k, v in batch.items()}))
    rep.loss = outputs.loss.item()
    if not math.isfinite(rep.loss):
        raise StepFailed("loss", f"the loss on this sample is {rep.loss}")
    line("loss", f"{rep.loss:.4f} on {len(rep.loss_positions)} tokens")
    tic = time.perf_counter()
    with torch.autocast(device.type, dtype=b.dtype, enabled=amp):
        rep.generated = _step("generate", lambda: generate(model, [prompt], tok, device, MAX_NEW_TOKENS, 1, 0.0)[0])
    line(
        "generate",
        f"greedy, ≤{MAX_NEW_TOKENS} new tokens, {time.perf_counter() - tic:.1f} s on {device}: {rep.generated!r}",
    )
    if vlm.tiny is not None and vlm.name_or_path is None:
        line(
            "",
            "(expected: the tiny preset's weights are random, so its greedy answer is repeated sub-words; "
            "it shows that generation runs, not what a trained model says)",
        )
    return rep


def config_for_model(path: str, overrides: list[str]) -> Config:
    data = apply_overrides({"name": "check-model", "model": {"name_or_path": path}, "data": {"root": "."}}, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, f"--model {path}" + (" + overrides" if overrides else ""))) from None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="medlava check-model",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Memory formula:\n" + (Memory.__doc__ or ""),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the recipe the job will run (jobs/configs/*.yaml)")
    src.add_argument("--model", help="a transformers LLaVA checkpoint (hub id or directory), default sft settings")
    p.add_argument("--stage", choices=("sft", "align"), default="sft", help="which training stage to mirror")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for the stage")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides) if args.config else config_for_model(args.model, args.overrides)
        check_model(cfg, args.stage)
    except (ConfigError, InputError, FileNotFoundError) as e:
        print(f"medlava check-model: {e}", file=sys.stderr)
        return 2
    except StepFailed as e:
        print(f"FAIL       {e}", file=sys.stderr)
        return 1
    print("OK         the model loads, renders, computes a loss and generates as the job will")
    return 0
