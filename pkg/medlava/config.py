"""Typed configs: one YAML per recipe plus `key=value` overrides, refused before anything runs.

pydantic does the type checking; this module adds the override syntax, the cross-field rules and
error messages that name the key and what it accepts.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config that must not run; the message names the key and what is allowed."""


MAX_INT = 2**31 - 1
"""The largest integer a recipe holds: every count, size and seed is far below it, and past 2**63 torch and
numpy cannot take one at all (a batch size of 10**26 would pass the dry-run and fail on the nodes)."""
MAX_YAML_VALUES = 100_000
"""Values YAML aliases may add to a recipe or override when expanded (whole recipes hold a few hundred)."""
Seed = Annotated[int, Field(ge=0)]  # numpy's generators refuse negative seeds
Positive = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1)]

_REPR = reprlib.Repr()  # error messages echo inputs, and an input may be megabytes long: cut it short
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxlong = 40
_short = _REPR.repr


class Section(BaseModel):
    # allow_inf_nan: no key means infinity or NaN (`lr=.inf` trains to NaN weights, `epochs=1e400` overflows)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _int_range(cls, value: Any) -> Any:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
                raise ValueError(
                    f"{_short(v)} is out of range: integers in a recipe are at most {MAX_INT:,} "
                    "in size; check for a typo"
                )
        return value


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
    seed: Seed = 0

    @model_validator(mode="after")
    def _shapes(self) -> TinyModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(
                f"vision_hidden {self.vision_hidden} must be a multiple of vision_heads "
                f"{self.vision_heads} (each attention head gets hidden / heads dimensions)"
            )
        if self.text_hidden % (2 * self.text_heads):
            raise ValueError(
                f"text_hidden {self.text_hidden} must be a multiple of 2 x text_heads {self.text_heads} "
                "(each head's dimensions are split in two halves by the rotary embedding)"
            )
        if self.text_heads % self.text_kv_heads:
            raise ValueError("text_heads must be a multiple of text_kv_heads")
        return self


class ModelConfig(Section):
    name_or_path: str | None = None
    """Hub id or local dir of a transformers LLaVA checkpoint; None with `tiny` set builds one."""
    tiny: TinyModelConfig | None = None
    template: Literal["mistral_instruct", "vicuna_v1", "plain"] = "mistral_instruct"
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_4", "flex_attention"
    ] = "auto"
    """Training's attention. auto: flash-attn 2 where installed on a GPU; else, with packing on a GPU, FlexAttention on
    the language model (its document mask computes no padding); else SDPA. flash_attention_4 (the `flash-attn-4`
    wheel, Hopper or newer) only when named. Answering (infer, predict, serve) uses SDPA (eager when named): option
    scoring's shared-prefix mask and the static KV cache are 4-D masks, which flash-attn does not take."""
    image_aspect: Literal["pad", "crop"] = "pad"
    model_max_length: int = Field(2048, ge=16)
    vision_tower: str | None = None
    """An open_clip model directory (a `pretrain` checkpoint or run, or a local BiomedCLIP-style copy with
    open_clip_config.json) whose ViT replaces the LLaVA's CLIP tower, converted exactly; the projector is
    re-initialised when the width changes (train it with align)."""

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.name_or_path is None and self.tiny is None:
            raise ValueError("set model.name_or_path (hub id or local checkpoint) or model.tiny")
        return self


class SyntheticDataConfig(Section):
    n_lesions: int = Field(150, ge=14)
    max_images_per_lesion: int = Field(3, ge=1)
    image_size: int = Field(64, ge=16)
    seed: Seed = 0


SkipReason = Literal[
    "missing_image",
    "unreadable_image",
    "oversized_image",
    "image_outside_root",
    "bad_record",
    "unknown_label",
    "duplicate_id",
    "empty_report",
    "missing_section",
    "missing_report",
    "non_utf8",
]
"""Kinds of bad sample (medlava.data.problems.REASONS describes each)."""


class SlakeConfig(Section):
    source: Literal["local", "hf"] = "local"
    """local: train.json, validate.json (or validation.json), test.json and imgs/ under data.root.
    hf: a local copy of BoKelvin/SLAKE read with `datasets` (save_to_disk output, or the hub repo's data files);
    images under data.image_root (default data.root/imgs)."""
    language: Literal["en", "zh", "all"] = "en"
    """Keep questions whose q_lang is this (the English test set has 1,061)."""
    instruction: str = ""
    """Appended to every question, e.g. 'Answer with a single word or phrase.' (lmms-eval's slake_en)."""
    kg: Literal["none", "triple", "facts"] = "none"
    """Knowledge in the prompt: triple = the question's own KG triple; facts = matching rows of KG/en_*.csv."""
    kg_max_facts: int = Field(5, ge=1)
    mask: Literal["none", "crop", "masked"] = "none"
    """Condition on imgs/*/mask.png: crop to the mask's bounding box, or black out the background."""
    mask_margin: float = Field(0.05, ge=0, le=0.5)
    """Crop margin, as a fraction of the box size on each side."""
    debug_images: int = Field(8, ge=0)
    """With a mask: how many side-by-side images (source | mask | what the model sees) to write to debug/."""


class MimicCxrConfig(Section):
    image_layout: Literal["official", "flat"] = "official"
    """official: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg (MIMIC-CXR-JPG); flat: images/{study_id}-{dicom_id}.png
    (seed 003)."""
    views: list[Name] = Field(["PA", "AP"], min_length=1)
    """ViewPosition values kept (frontal only by default)."""
    section: Literal["findings", "impression", "findings_impression"] = "findings"
    """What the model is trained to write."""
    prompt: str = "Describe the findings of the chest X-ray."
    split: Literal["official", "grouped"] = "official"
    """official: mimic-cxr-2.0.0-split.csv (validate -> val); grouped: data.split_ratios by subject_id."""
    reports_root: str | None = None
    """Folder holding files/pXX/... report .txt files; default data.root."""


class LlmQAConfig(Section):
    base_url: str
    """An OpenAI-compatible endpoint, e.g. http://node12:8000/v1 (a vLLM server)."""
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (never written to configs or logs); unset: no key is sent."""
    max_retries: int = Field(5, ge=0)
    requests_per_minute: float = Field(60.0, gt=0)
    concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    temperature: float = Field(0.0, ge=0)
    cache_dir: str | None = None
    """Answers kept on disk by request hash, so a re-run costs nothing; default <output_root>/<name>/qa-cache."""


class ChexpertPlusConfig(Section):
    csv: str = "df_chexpert_plus_240401.csv"
    """The report/image table, relative to data.root; images under data.image_root (default data.root)."""
    generator: Literal["rules", "llm"] = "rules"
    """rules: deterministic questions from the labeled findings (presence, location, severity); llm: `llm`."""
    qa_per_report: int = Field(5, ge=1)
    llm: LlmQAConfig | None = None
    frontal_only: bool = True
    split: Literal["grouped", "official"] = "grouped"
    """grouped: data.split_ratios by deid_patient_id; official: the CSV's split column (train, valid -> val)."""


class LlavaMedConfig(Section):
    train_file: str = "llava_med_instruct_60k.json"
    """A LLaVA-Med JSON (alignment or instruct), relative to data.root; images under data.image_root
    (default data.root/images), split by data.split_ratios grouped by PMC article."""
    eval_file: str | None = None
    """llava_med_eval_qa50_qa.jsonl (question file) as the test split."""


class VqaRadConfig(Section):
    source: Literal["osf", "hf"] = "osf"
    """osf: the OSF release (`VQA_RAD Dataset Public.json`, images in `VQA_RAD Image Folder/`, or data.image_root);
    hf: a local copy of flaviagiammarino/vqa-rad (data/{train,test}-*.parquet, images inside)."""
    instruction: str = ""
    """Appended to every question (LLaVA-Med asks the question as it is)."""


class PathVqaConfig(Section):
    instruction: str = ""
    """Appended to every question of the local copy of flaviagiammarino/path-vqa (data/{split}-*.parquet)."""


class PmcVqaConfig(Section):
    train_file: str | None = "train.csv"
    """The training CSV under data.root (version 2: train_2.csv); null: no train split."""
    test_file: str = "test_clean.csv"
    """The test CSV: test_clean.csv (the 2k-question clean test set most papers report), test.csv or test_2.csv.
    Images under data.image_root, else data.root/figures, else data.root/images."""


class OmniMedVqaConfig(Section):
    access: Literal["open", "all"] = "open"
    """open: QA_information/Open-access/*.json (what is distributed with images); all: Restricted-access too."""


MMMU_MEDICINE = [
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
]
"""MMMU's Health and Medicine discipline (its DOMAIN_CAT2SUB_CAT)."""


class MmmuMedConfig(Section):
    subjects: list[str] = MMMU_MEDICINE
    """Subject folders under data.root (each holding {dev,validation,test}-*.parquet)."""
    images: Literal["first", "all"] = "first"
    """first: image_1 only, as MMMU's own LLaVA evaluation (run_llava.py) feeds it; all: every image of the
    question side by side in one (its `<image k>` is the k-th from the left)."""


class MedXpertQAConfig(Section):
    images: Literal["all", "first"] = "all"
    """all: a question's images side by side in one (the k-th from the left is its k-th); first: the first only."""


BENCHMARKS = ("vqa_rad", "path_vqa", "pmc_vqa", "omnimedvqa", "medxpertqa", "mmmu_med")
"""The medical VQA benchmarks read with their published splits (SLAKE too)."""


class DataConfig(Section):
    dataset: Literal[
        "ham10000",
        "slake",
        "mimic_cxr",
        "chexpert_plus",
        "llava_med",
        "vqa_rad",
        "path_vqa",
        "pmc_vqa",
        "omnimedvqa",
        "medxpertqa",
        "mmmu_med",
    ] = "ham10000"
    root: str
    """Raw dataset as distributed (HAM10000: HAM10000_metadata.csv + image folders; the others: their sections)."""
    image_root: str | None = None
    """Where images are, when not where the dataset puts them under root (see each dataset's section)."""
    synthetic: SyntheticDataConfig | None = None
    """Generate a synthetic dataset at `root` when it does not exist (tiny preset, tests)."""
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_file: str | None = None
    skip_missing_images: bool = False
    skip: list[SkipReason] = []
    """Kinds of bad sample to skip and count in prepare_report.json instead of stopping (`--check` lists all)."""
    verify_images: Literal["decode", "header", "none"] = "decode"
    """decode: every image decoded once (finds truncated files); header: size only; none."""
    workers: int = Field(8, ge=1)
    """Threads decoding images while checking them."""
    slake: SlakeConfig = SlakeConfig()
    mimic_cxr: MimicCxrConfig = MimicCxrConfig()
    chexpert_plus: ChexpertPlusConfig = ChexpertPlusConfig()
    llava_med: LlavaMedConfig = LlavaMedConfig()
    vqa_rad: VqaRadConfig = VqaRadConfig()
    path_vqa: PathVqaConfig = PathVqaConfig()
    pmc_vqa: PmcVqaConfig = PmcVqaConfig()
    omnimedvqa: OmniMedVqaConfig = OmniMedVqaConfig()
    medxpertqa: MedXpertQAConfig = MedXpertQAConfig()
    mmmu_med: MmmuMedConfig = MmmuMedConfig()
    seed: Seed = 0
    samples: str = "latest"
    """Prepared samples for train/infer: `latest` (newest complete prepare run) or a directory."""

    def image_dir(self, default: Path) -> Path:
        """image_root when it is set, else `default`: where the dataset's release keeps its images under root."""
        return Path(self.image_root) if self.image_root else default

    @model_validator(mode="after")
    def _ratios(self) -> DataConfig:
        if any(r < 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1) > 1e-6:
            raise ValueError(f"data.split_ratios must be >= 0 and sum to 1, got {list(self.split_ratios)}")
        return self

    @model_validator(mode="after")
    def _dataset_options(self) -> DataConfig:
        for key in ("slake", "mimic_cxr", "chexpert_plus", "llava_med", *BENCHMARKS):
            if key != self.dataset and getattr(self, key) != type(getattr(self, key))():
                raise ValueError(
                    f"data.{key} is set but data.dataset is {self.dataset}; set data.dataset={key} or remove data.{key}"
                )
        if self.synthetic is not None and self.dataset != "ham10000":
            raise ValueError(
                "data.synthetic generates HAM10000 only; remove it for data.dataset="
                f"{self.dataset} (tests build the other layouts with tests/synthetic/)"
            )
        published = self.dataset in ("slake", *BENCHMARKS)
        official = (
            published
            or (self.dataset == "mimic_cxr" and self.mimic_cxr.split == "official")
            or (self.dataset == "chexpert_plus" and self.chexpert_plus.split == "official")
        )
        if self.split_file and official:
            raise ValueError(
                f"data.split_file is set but {self.dataset} uses its official split; remove it"
                + ("" if published else f" or set data.{self.dataset}.split=grouped")
            )
        if self.split_file and self.dataset == "llava_med":
            raise ValueError("data.split_file is not read for llava_med (its split is by data.split_ratios)")
        if self.dataset == "llava_med" and self.llava_med.eval_file and self.split_ratios[2] > 0:
            raise ValueError(
                "data.llava_med.eval_file is the test split; set data.split_ratios' test share to 0 "
                f"(e.g. [0.95, 0.05, 0.0]), got {list(self.split_ratios)}"
            )
        if self.dataset == "chexpert_plus" and self.chexpert_plus.generator == "llm" and self.chexpert_plus.llm is None:
            raise ValueError(
                "data.chexpert_plus.generator=llm needs data.chexpert_plus.llm "
                "(base_url and model of an OpenAI-compatible endpoint)"
            )
        if self.skip_missing_images and "missing_image" not in self.skip:
            self.skip = [*self.skip, "missing_image"]  # the older switch for one reason
        return self


class LoraConfig(Section):
    r: int = Field(128, ge=1)
    alpha: int = Field(256, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[Name] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )


class LoopConfig(Section):
    """What every training loop (align, sft, pretrain) takes: when it saves, what it keeps, how it resumes."""

    save_every: int | None = Field(None, ge=1)
    """Steps between checkpoints (one is always written at the end, and at a stop request)."""
    keep_last: int | None = Field(2, ge=1)
    """The newest checkpoints kept after each save; null keeps every one."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest complete checkpoint of this run (same run_id)."""
    log_every: int = Field(1, ge=1)
    seed: Seed = 0


class TrainConfig(LoopConfig):
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
    """Padding-free: each micro-batch packed into one row with per-sample positions; variable-length attention
    (flash-attn's varlen kernels, else FlexAttention's document mask on a GPU) keeps the samples apart."""
    kernels: Literal["none", "liger"] = "none"
    """liger: Liger's fused kernels on the LLaVA (RMSNorm, SwiGLU, RoPE of its Mistral/Llama language model, and a
    linear cross-entropy that never materialises the logits); CUDA GPUs only, the `gpu` extra."""
    compile: bool = False
    """torch.compile each transformer block (language model and vision tower) in place; the first steps compile."""
    deepspeed: Literal["none", "zero2", "zero3", "zero3_offload"] = "none"
    """none: plain DDP. zero2/zero3(_offload): DeepSpeed ZeRO, config generated from this section."""
    train_vision: bool = False
    train_projector: bool = True
    train_llm: bool = False
    lora: LoraConfig | None = None
    init_from: str = "none"
    """Projector weights to start from: `none`, `latest` (newest complete align run) or a checkpoint dir."""
    eval_every: int | None = Field(None, ge=1)
    """Every this many steps and at the last: the loss on the prepared val split (`val/loss`) and, for closed
    questions, option-scored accuracy on a fixed subset (`val/closed_accuracy`), in TensorBoard and the console."""
    eval_closed_samples: int = Field(200, ge=0)
    """At most this many closed validation questions scored each time (the same ones every time); 0: loss only."""
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        if self.lora is not None and self.train_llm:
            raise ValueError(
                "lora and train_llm are exclusive: LoRA trains adapters on a frozen LLM; "
                "set train_llm=false for LoRA or lora=null for a full fine-tune"
            )
        if not (self.train_vision or self.train_projector or self.train_llm or self.lora):
            raise ValueError("nothing to train: enable one of train_vision, train_projector, train_llm or lora")
        if self.projector_lr is not None and not self.train_projector:
            raise ValueError("projector_lr is set but train_projector is false")
        if self.deepspeed.startswith("zero3") and self.kernels == "liger":
            # huggingface/trl#3368: the fused loss multiplies by lm_head.weight without running lm_head.
            raise ValueError(
                "kernels=liger cannot run under ZeRO-3: Liger's fused cross-entropy reads lm_head's "
                "weight outside its forward, where ZeRO-3 leaves it sharded; use deepspeed=zero2 or none"
            )
        if self.deepspeed.startswith("zero3") and self.compile:
            raise ValueError(
                "compile=true cannot run under ZeRO-3: its parameter-gathering hooks fire inside each "
                "compiled block; use deepspeed=zero2 or none, or compile=false"
            )
        return self


class InferConfig(Section):
    split: Literal["train", "val", "test"] = "test"
    checkpoint: str = "latest"
    """`latest` (newest complete sft run), `base` (the model as configured) or a checkpoint dir."""
    chunks: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(2, ge=0)
    """DataLoader processes preparing the next batches (decode, resize, tokenise) while the model answers."""
    mode: Literal["score", "generate"] = "score"
    """score: questions of `score_tasks` answered by option log-likelihood, the rest generated; generate: free text
    for every question (answers to questions with choices are then mapped to a choice, unmapped ones score wrong)."""
    score_tasks: list[Literal["closed", "multiple_choice"]] = ["closed", "multiple_choice"]
    """In mode score, the tasks answered by likelihood; LLaVA-Med's protocol generates its closed answers, so a
    suite reproducing its table scores multiple_choice only."""
    max_new_tokens: int = Field(32, ge=1)
    num_beams: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)
    questions: str | None = None
    """A LLaVA-Med question file (JSONL: question_id, image, text [, answer, answer_type, choices, ...]) to
    answer instead of a prepared split (then `split` and data.samples are not used)."""
    image_root: str | None = None
    """Image folder of `questions` (LLaVA-Med's --image-folder); default: the question file's folder."""
    compile: bool = False
    """Free-text answers decode with a static KV cache and a compiled forward (CUDA graphs on a GPU); each new
    batch shape compiles once (prompts are padded to a multiple of 64 tokens so shapes repeat)."""


class EvalConfig(Section):
    predictions: str = "latest"
    """`latest` (newest complete infer run) or a run directory / predictions.csv."""
    n_bootstrap: int = Field(1000, ge=0)
    family: Literal["auto", "classification", "vqa", "report"] = "auto"
    """auto: from the `task` column: closed/label -> classification, open (with closed) -> vqa, report -> report."""
    closed_vocab: str | None = None
    """VQA candidate routing fallback: a JSON list of answers or a sample JSONL (its closed answers);
    default: the train split of the prepared samples the predictions came from, when there is one."""
    error_dump: int = Field(50, ge=0)
    """How many of the worst samples errors.csv lists, with their prompts."""
    uncertain_as_positive: bool = False
    """Report label F1: count an uncertain CheXpert label as positive (f1chexbert's rrg mode) instead of negative."""
    bertscore_model: str | None = None
    """BERTScore encoder: a local directory or cached hub id (CXR-Report-Metric: distilroberta-base); unset: skipped."""
    bertscore_layers: int | None = Field(None, ge=1)
    """Layer whose embeddings BERTScore compares; unset: bert-score's tuned layer for a known model name."""
    bertscore_baseline: str | None = None
    """bert-score baseline TSV for this model to rescale with (CXR-Report-Metric rescales); unset: raw scores."""
    chexbert_checkpoint: str | None = None
    """CheXbert weights (chexbert.pth) for CheXbert-embedding similarity; unset: skipped."""
    chexbert_tokenizer: str = "bert-base-uncased"
    """Tokenizer of the CheXbert checkpoint: a local directory or cached hub id."""
    batch_size: int = Field(32, ge=1)
    """Batch size of the model-based metrics (BERTScore, CheXbert); RadEval's metrics write their scores every
    this many reports (a killed job resumes after the last such batch)."""
    report_metrics: list[str] | None = None
    """Reports: RadEval metrics (bleu, rouge, bertscore, f1chexbert, radgraph, radcliq, ratescore, green); unset:
    every one without an LLM whose weights are staged and that can run here (the rest are listed in metrics.json).
    A list given is required whole: a metric that cannot run stops the job before it starts."""
    metric_cache: str | None = None
    """Staged weights of the report metrics (`medlava weights fetch --cache DIR`); unset: $MEDLAVA_CACHE/metric-weights
    (~/.cache/medlava/metric-weights). Jobs read it offline."""
    chunks: int = Field(1, ge=1)
    """Reports: score the model-based metrics in this many job-array tasks, then merge (like infer.chunks)."""


class SuiteBenchmark(Section):
    """One benchmark of a suite: the dataset adapter, where its release is, and the split that is scored."""

    dataset: Literal["slake", "vqa_rad", "path_vqa", "pmc_vqa", "omnimedvqa", "medxpertqa", "mmmu_med"]
    root: str
    """The release's folder; relative paths are under data.root."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The row label and output folder; default: the dataset (set it to score one dataset twice)."""
    split: Literal["train", "val", "test"] = "test"
    """The split scored: test, except MMMU (val: its test answers are not released)."""
    image_root: str | None = None
    options: dict[str, Any] = {}
    """The dataset's own section (data.<dataset>), e.g. {source: hf} for vqa_rad."""

    @property
    def label(self) -> str:
        return self.name or self.dataset


class SuiteConfig(Section):
    """The `suite` stage: prepare (cached), answer and score several benchmarks, each by its published protocol,
    with the model and answering settings of `infer:`, and write one leaderboard."""

    benchmarks: list[SuiteBenchmark] = []
    synthetic: bool = False
    """Write tiny copies of the seven releases under data.root when absent (the tiny preset, tests)."""
    n_bootstrap: int = Field(1000, ge=0)
    """Resamples of each leaderboard row's questions for its 95% interval."""
    seed: Seed = 0

    @model_validator(mode="after")
    def _unique(self) -> SuiteConfig:
        labels = [b.label for b in self.benchmarks]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"suite.benchmarks lists {twice} more than once; give each a distinct `name`")
        return self


class CnnConfig(Section):
    """The `cnn` stage: a timm image classifier, optionally with a patient-metadata branch, trained on the
    prepared samples (seed 000: resnet18 from scratch; seed 004: EfficientNetV2-S + metadata, two phases)."""

    arch: str = "resnet18"
    """A timm model name: resnet18, tf_efficientnetv2_s, ... (`timm.list_models()`)."""
    pretrained: str | None = None
    """Local weights file of that timm model (.safetensors/.pth) to start from; unset: random init. Nothing
    is downloaded at run time."""
    metadata: bool = False
    """Age (normalised with training statistics), sex and localization (embedded) concatenated with the image
    features before the head."""
    head_hidden: list[Positive] = []
    """Hidden widths of the classifier head (seed 004: [512, 128]); empty: one linear layer."""
    dropout: float = Field(0.0, ge=0, lt=1)
    image_size: int = Field(224, ge=16)
    augment: bool = True
    """Dermoscopy augmentations: flips, any rotation, scale jitter, colour jitter (training only)."""
    epochs: int = Field(50, ge=1)
    frozen_epochs: int = Field(0, ge=0)
    """Phase 1: the backbone is frozen for this many epochs; only the head (and metadata branch) train."""
    unfreeze_fraction: float = Field(1.0, gt=0, le=1)
    """Phase 2: the last fraction of the backbone's layer groups (timm's blocks) trains; 1 = all of it."""
    batch_size: int = Field(32, ge=1)
    """Per device."""
    lr: float = Field(1e-3, gt=0)
    finetune_lr: float | None = Field(None, gt=0)
    """Learning rate of phase 2; unset: lr."""
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    """Per phase: cosine decay to 0 over the phase's epochs, or constant."""
    class_balance: Literal["none", "weights", "sampler"] = "none"
    """weights: loss weighted by inverse class frequency; sampler: batches drawn class-balanced."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    patience: int | None = Field(10, ge=1)
    """Early stopping: stop after this many epochs (within a phase) without a better validation macro-F1."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 autocast on GPUs that have it, else fp16 with loss scaling; fp32 on CPU."""
    predict_split: Literal["val", "test"] = "test"
    """The split the best checkpoint answers into predictions.csv."""
    num_workers: int = Field(4, ge=0)
    resume: Literal["auto", "never"] = "auto"
    keep_last: int | None = Field(1, ge=1)
    """The newest epoch checkpoints kept after each save, besides the best; null keeps every one."""
    seed: Seed = 0

    @model_validator(mode="after")
    def _phases(self) -> CnnConfig:
        if self.frozen_epochs >= self.epochs:
            raise ValueError(
                f"cnn.frozen_epochs={self.frozen_epochs} leaves no epoch to fine-tune in "
                f"(cnn.epochs={self.epochs}); raise epochs or lower frozen_epochs"
            )
        if self.finetune_lr is not None and self.frozen_epochs == 0:
            raise ValueError(
                "cnn.finetune_lr is the rate after the frozen epochs, but cnn.frozen_epochs=0: set cnn.lr instead"
            )
        return self


class PretrainConfig(LoopConfig):
    """The `pretrain` stage: CLIP-style contrastive image-text pretraining with open_clip on the prepared
    samples' image-caption pairs, evaluated by retrieval recall@K and zero-shot classification."""

    model: str = "ViT-B-16"
    """An open_clip model config (`open_clip.list_models()`, or medlava's `medlava-tiny-clip`), or
    `local-dir:PATH`, an open_clip model directory to continue from (a pretrain checkpoint, a BiomedCLIP copy)."""
    text_tower: str | None = None
    """A local directory of a transformers text encoder and its tokenizer (PubMedBERT-style) to use as the text
    tower, its weights loaded; unset: the config's own text transformer. Nothing is downloaded."""
    context_length: int | None = Field(None, ge=8)
    """Text tokens per caption; unset: the model config's."""
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=2)
    """Per device; the contrastive batch is batch_size x world size (features are gathered across ranks)."""
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 autocast on GPUs that have it, else fp16 with loss scaling; fp32 on CPU."""
    gradient_checkpointing: bool = False
    """open_clip's set_grad_checkpointing on both towers."""
    local_loss: bool = True
    """open_clip ClipLoss: each rank scores its own rows against all gathered features (O(B x global B))."""
    gather_with_grad: bool = True
    """Gather features across ranks with gradients flowing back (open_clip's recommended multi-node setting)."""
    prompt_templates: list[str] = []
    """Zero-shot class prompts, `{}` standing for the class name; empty: the dataset's own (dermoscopy, chest x-ray)."""
    eval_split: Literal["val", "test"] = "test"
    """The split scored by retrieval and zero-shot classification after training."""
    num_workers: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _prompts(self) -> PretrainConfig:
        bad = [t for t in self.prompt_templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"pretrain.prompt_templates {bad} must each hold one `{{}}` for the class name")
        return self


class ClusterConfig(Section):
    # `cluster.time=30`, `cluster.partition=2080` arrive from YAML as numbers; SLURM wants their text.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    executor: Literal["auto", "local", "slurm"] = "auto"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    """0 = CPU; >1 starts torchrun with one process per GPU."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    mem: str | None = None
    """Memory per node (`--mem`, e.g. 256G); for jobs with GPUs, cluster.mem_per_gpu wins when set."""
    mem_per_gpu: str | None = None
    """Memory per GPU (`--mem-per-gpu`, e.g. 64G) of jobs with GPUs: a one-GPU infer task asks for one share, a
    training job for one per GPU. Jobs without GPUs (prepare, eval) ask for cluster.mem."""
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

    @field_validator("*")
    @classmethod
    def _no_control_characters(cls, value: Any, info) -> Any:
        # A newline would end an `#SBATCH` line and start a shell line of the job script (and the #SBATCH
        # lines after it would be ignored); no SLURM value needs a control character.
        texts = value if isinstance(value, list) else [*value, *value.values()] if isinstance(value, dict) else [value]
        for text in texts:
            if isinstance(text, str) and re.search(r"[\x00-\x1f\x7f-\x9f]", text):
                raise ValueError(
                    f"cluster.{info.field_name} value {text!r} holds a control character (newline, tab, "
                    "...); SLURM values are one line of printable text: remove it"
                )
        return value


class Config(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_root: str = "runs"
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig | None = None
    """The VLM that align, sft and infer run; a CNN-only recipe leaves it out."""
    data: DataConfig
    # Sections default to their class defaults only, so `align.lr=...` on a recipe without an
    # `align:` section means the same as writing the section out.
    align: TrainConfig = TrainConfig()
    """The alignment stage: projector only (LLaVA's tune_mm_mlp_adapter)."""
    sft: TrainConfig = TrainConfig()
    """The sft stage."""
    infer: InferConfig = InferConfig()
    eval: EvalConfig = EvalConfig()
    suite: SuiteConfig = SuiteConfig()
    cnn: CnnConfig = CnnConfig()
    pretrain: PretrainConfig = PretrainConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _stages(self) -> Config:
        a = self.align
        if a.train_llm or a.lora is not None or a.train_vision or not a.train_projector:
            raise ValueError(
                "align trains the projector only: align.train_projector=true and "
                "align.train_llm/train_vision=false, align.lora=null"
            )
        if self.model and self.model.template == "plain" and self.sft.lora is not None:
            raise ValueError(
                "model.template=plain is the alignment template; sft needs a chat template "
                "(mistral_instruct or vicuna_v1)"
            )
        return self

    def vlm(self, stage: str) -> ModelConfig:
        """The model section, which `stage` needs: a ConfigError naming the fix when the recipe has none."""
        if self.model is None:
            raise ConfigError(
                f"{stage} runs a VLM, but this recipe ({self.name}) has no `model:` section; add one "
                "with model.name_or_path (a LLaVA checkpoint) or model.tiny"
            )
        return self.model

    @model_validator(mode="after")
    def _global_batch(self) -> Config:
        world = self.cluster.nodes * max(self.cluster.gpus_per_node, 1)
        for key, t in (("align", self.align), ("sft", self.sft)):
            if t.global_batch_size is None:
                continue
            per_step = t.batch_size * world
            accum = t.global_batch_size // per_step
            if t.global_batch_size % per_step:
                raise ValueError(
                    f"{key}.global_batch_size={t.global_batch_size} is not divisible by {key}.batch_size "
                    f"{t.batch_size} x world size {world} (cluster.nodes x GPUs per node) = {per_step}; "
                    "change one of them"
                )
            if "grad_accum" in t.model_fields_set and t.grad_accum != accum:
                raise ValueError(
                    f"{key}.global_batch_size={t.global_batch_size} means grad_accum={accum} at batch_size "
                    f"{t.batch_size} and world size {world}, but {key}.grad_accum={t.grad_accum}; set one"
                )
            t.grad_accum = accum
        return self


class RecipeYamlError(yaml.YAMLError):
    """YAML that parses but must not load: a key given twice, an alias bomb."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the second would silently replace the
    first) and aliases that expand past MAX_YAML_VALUES values (PyYAML shares an aliased node, so a few hundred
    bytes of nested aliases load instantly, then cost minutes and gigabytes to validate and print)."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        sizes: dict[int, int] = {}
        if _expanded_size(node, sizes, set()) - len(sizes) > MAX_YAML_VALUES:
            raise RecipeYamlError(
                f"its YAML aliases add more than {MAX_YAML_VALUES:,} values (an alias bomb? each "
                "alias copies its anchor's whole value, aliases inside it included); write the "
                "values out or nest fewer aliases"
            )
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merged mapping's keys are meant to be overridden
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in lines:
                raise RecipeYamlError(
                    f"key {_short(key)} is given twice, on lines {lines[key]} and {line}: the second would silently "
                    "replace the first; merge them into one"
                )
            lines[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` holds with every alias expanded, each distinct node's count kept in `sizes`;
    RecipeYamlError on an alias inside its own anchor."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise RecipeYamlError(
            f"line {node.start_mark.line + 1}: an alias refers to the value that holds it (a "
            "recursive YAML alias); write the value out"
        )
    open_.add(id(node))
    children = (
        []
        if isinstance(node, yaml.ScalarNode)
        else [c for pair in node.value for c in pair]
        if isinstance(node, yaml.MappingNode)
        else node.value
    )
    sizes[id(node)] = 1 + sum(_expanded_size(c, sizes, open_) for c in children)
    open_.discard(id(node))
    return sizes[id(node)]


def read_yaml(text: str) -> Any:
    """`text` as YAML, through _RecipeLoader; yaml.YAMLError (RecipeYamlError included) when it must not load."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except (ValueError, RecursionError) as e:  # an integer of too many digits; nesting deeper than Python's stack
        raise RecipeYamlError(f"{type(e).__name__}: {_short(str(e))}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`sft.lr=2e-4` -> (["sft", "lr"], "2e-4"); values are YAML (`[a, b]`, `null`, `true`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {_short(text)} is not key=value (example: sft.lr=2e-4)")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {_short(key)}: value {_short(raw)} is not valid YAML ({e})") from None
    return key.split("."), value


# Sections renamed after the stage they configure: old name -> new name.
RENAMED = {"train": "sft"}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        if path[0] in RENAMED:
            new = ".".join([RENAMED[path[0]], *path[1:]])
            raise ConfigError(
                f"override {_short(text)}: the `{path[0]}:` section is now `{RENAMED[path[0]]}:` (named after "
                f"its stage); write {new}={text.partition('=')[2]}"
            )
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {_short(text)}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = next(
            (
                t
                for t in getattr(annotation, "__args__", (annotation,))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
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
            got = f" (got {_short(e['input'])})" if e["type"] not in {"missing", "value_error"} else ""
            lines.append(f"  {key}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read YAML, apply overrides, validate. Raises ConfigError with every problem listed."""
    path = Path(path)
    try:
        data = read_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (recipes live in jobs/configs/)") from None
    except RecipeYamlError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for old in RENAMED.keys() & data.keys():
        raise ConfigError(
            f"{path}: the `{old}:` section is now `{RENAMED[old]}:` (sections are named after their "
            f"stage); rename it in the recipe"
        )
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path) + (" + overrides" if overrides else ""))) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def changed_settings(then: dict, now: dict) -> list[str]:
    """The dotted keys whose values differ between two records of settings, as `key: old then, new now`."""
    return [
        f"{k}: {_short(then.get(k))} then, {_short(now.get(k))} now"
        for k in sorted(set(then) | set(now))
        if then.get(k) != now.get(k)
    ]
