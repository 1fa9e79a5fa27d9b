"""Typed configs: one YAML per recipe plus `key=value` overrides, refused before anything runs.

pydantic does the type checking; this module adds the override syntax, the cross-field rules and
error messages that name the key and what it accepts.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that must not run; the message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """A random-initialised LLaVA (CLIP vision + Mistral LM) small enough for a CPU."""

    image_size: int = Field(32, ge=8)
    patch_size: int = Field(8, ge=1)
    vision_hidden: int = Field(32, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(2, ge=1)
    text_hidden: int = Field(64, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    text_kv_heads: int = Field(2, ge=1)
    text_intermediate: int = Field(128, ge=8)
    vocab_size: int = Field(512, ge=300)
    head_init_std: float = Field(0.3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _shapes(self) -> TinyModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.text_heads % self.text_kv_heads:
            raise ValueError("text_heads must be a multiple of text_kv_heads")
        return self


class ModelConfig(Section):
    name_or_path: str | None = None
    """Hub id or local dir of a transformers LLaVA checkpoint; None with `tiny` set builds one."""
    tiny: TinyModelConfig | None = None
    template: Literal["mistral_instruct", "vicuna_v1", "plain"] = "mistral_instruct"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    image_aspect: Literal["pad", "crop"] = "pad"
    model_max_length: int = Field(2048, ge=16)

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.name_or_path is None and self.tiny is None:
            raise ValueError("set model.name_or_path (hub id or local checkpoint) or model.tiny")
        return self


class SyntheticDataConfig(Section):
    n_lesions: int = Field(150, ge=14)
    max_images_per_lesion: int = Field(3, ge=1)
    image_size: int = Field(64, ge=16)
    seed: int = 0


class DataConfig(Section):
    dataset: Literal["ham10000"] = "ham10000"
    root: str
    """Raw dataset as distributed (for HAM10000: HAM10000_metadata.csv + image folders)."""
    synthetic: SyntheticDataConfig | None = None
    """Generate a synthetic dataset at `root` when it does not exist (tiny preset, tests)."""
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_file: str | None = None
    skip_missing_images: bool = False
    seed: int = 0
    samples: str = "latest"
    """Prepared samples for train/infer: `latest` (newest complete prepare run) or a directory."""

    @model_validator(mode="after")
    def _ratios(self) -> DataConfig:
        if any(r < 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1) > 1e-6:
            raise ValueError(f"data.split_ratios must be >= 0 and sum to 1, got {list(self.split_ratios)}")
        return self


class LoraConfig(Section):
    r: int = Field(128, ge=1)
    alpha: int = Field(256, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    """Per device; the global batch is batch_size * grad_accum * world size."""
    grad_accum: int = Field(1, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    """Samples per optimizer step over all ranks; when set, grad_accum follows from it and the world size
    (cluster.nodes x GPUs per node) and it must divide evenly."""
    lr: float = Field(2e-4, gt=0)
    projector_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    """Batches of similar length (LLaVA's group_by_modality_length): less padding, same samples per epoch."""
    packing: bool = False
    """Padding-free: each micro-batch packed into one row with per-sample positions (block-diagonal mask)."""
    deepspeed: Literal["none", "zero2", "zero3", "zero3_offload"] = "none"
    """none: plain DDP. zero2/zero3(_offload): DeepSpeed ZeRO, config generated from this section."""
    train_vision: bool = False
    train_projector: bool = True
    train_llm: bool = False
    lora: LoraConfig | None = None
    init_from: str = "none"
    """Projector weights to start from: `none`, `latest` (newest complete align run) or a checkpoint dir."""
    save_every: int | None = Field(None, ge=1)
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest complete checkpoint of this run (same run_id)."""
    log_every: int = Field(1, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        if self.lora is not None and self.train_llm:
            raise ValueError("lora and train_llm are exclusive: LoRA trains adapters on a frozen LLM; "
                             "set train_llm=false for LoRA or lora=null for a full fine-tune")
        if not (self.train_vision or self.train_projector or self.train_llm or self.lora):
            raise ValueError("nothing to train: enable one of train_vision, train_projector, train_llm or lora")
        if self.projector_lr is not None and not self.train_projector:
            raise ValueError("projector_lr is set but train_projector is false")
        return self


class InferConfig(Section):
    split: Literal["train", "val", "test"] = "test"
    checkpoint: str = "latest"
    """`latest` (newest complete sft run), `base` (the model as configured) or a checkpoint dir."""
    chunks: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    mode: Literal["score", "generate"] = "score"
    """score: closed questions answered by option log-likelihood; generate: free text."""
    max_new_tokens: int = Field(32, ge=1)
    num_beams: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)


class EvalConfig(Section):
    predictions: str = "latest"
    """`latest` (newest complete infer run) or a run directory / predictions.csv."""
    n_bootstrap: int = Field(1000, ge=0)


class ClusterConfig(Section):
    executor: Literal["auto", "local", "slurm"] = "auto"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    """0 = CPU; >1 starts torchrun with one process per GPU."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    mem: str | None = None
    cpus_per_task: int = Field(8, ge=1)
    constraint: str | None = None
    exclusive: bool = False
    container: str | None = None
    """Apptainer image (.sif): each node's command runs in it (`apptainer exec --nv --bind ...`)."""
    array_parallelism: int = Field(16, ge=1)
    """Job-array tasks running at once (`--array=0-(K-1)%P`)."""
    signal_delay_s: int = Field(120, ge=0)
    """SIGUSR2 this long before the time limit (`--signal=USR2@N`): training checkpoints and requeues."""
    sbatch_extra: list[str] = []
    """More `#SBATCH` options, `--option=value` or `--flag` (e.g. --reservation=r1); values are quoted."""
    env: dict[str, str] = {}
    """Job environment; overrides the submitting shell's and medlava's defaults (OMP_NUM_THREADS, NCCL_DEBUG)."""


class Config(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_root: str = "runs"
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    # Sections default to their class defaults only, so `align.lr=...` on a recipe without an
    # `align:` section means the same as writing the section out.
    align: TrainConfig = TrainConfig()
    """The alignment stage: projector only (LLaVA's tune_mm_mlp_adapter)."""
    train: TrainConfig = TrainConfig()
    """The sft stage."""
    infer: InferConfig = InferConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _stages(self) -> Config:
        a = self.align
        if a.train_llm or a.lora is not None or a.train_vision or not a.train_projector:
            raise ValueError("align trains the projector only: align.train_projector=true and "
                             "align.train_llm/train_vision=false, align.lora=null")
        if self.model.template == "plain" and self.train.lora is not None:
            raise ValueError("model.template=plain is the alignment template; sft needs a chat template "
                             "(mistral_instruct or vicuna_v1)")
        return self

    @model_validator(mode="after")
    def _global_batch(self) -> Config:
        world = self.cluster.nodes * max(self.cluster.gpus_per_node, 1)
        for key, t in (("align", self.align), ("train", self.train)):
            if t.global_batch_size is None:
                continue
            per_step = t.batch_size * world
            accum = t.global_batch_size // per_step
            if t.global_batch_size % per_step:
                raise ValueError(f"{key}.global_batch_size={t.global_batch_size} is not divisible by {key}.batch_size "
                                 f"{t.batch_size} x world size {world} (cluster.nodes x GPUs per node) = {per_step}; "
                                 "change one of them")
            if "grad_accum" in t.model_fields_set and t.grad_accum != accum:
                raise ValueError(f"{key}.global_batch_size={t.global_batch_size} means grad_accum={accum} at batch_size "
                                 f"{t.batch_size} and world size {world}, but {key}.grad_accum={t.grad_accum}; set one")
            t.grad_accum = accum
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-4` -> (["train", "lr"], "2e-4"); values are YAML (`[a, b]`, `null`, `true`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not key=value (example: train.lr=2e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = next((t for t in getattr(annotation, "__args__", (annotation,)) if isinstance(t, type)
                      and issubclass(t, BaseModel)), None)
    return sorted(model.model_fields) if model else []


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" Did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
            lines.append(f"  {key}: unknown key.{hint} Allowed here: {', '.join(allowed)}")
        else:
            got = f" (got {e['input']!r})" if e["type"] not in {"missing", "value_error"} else ""
            lines.append(f"  {key}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read YAML, apply overrides, validate. Raises ConfigError with every problem listed."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (recipes live in jobs/configs/)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path) + (" + overrides" if overrides else ""))) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
