"""Load a transformers LLaVA checkpoint (hub id, local dir, or the tiny preset) as every stage does,
choose attention and dtype for this machine, and read medlava's own checkpoints back."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from medlava.artifacts import read_manifest
from medlava.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR = "multi_modal_projector"


def base_model_path(cfg: ModelConfig) -> str:
    if cfg.name_or_path is not None:
        base = cfg.name_or_path
    else:
        from medlava.models.tiny import tiny_checkpoint

        base = str(tiny_checkpoint(cfg.tiny))
    if cfg.vision_tower is None:
        return base
    from medlava.models.vision_tower import (
        llava_with_vision_tower,  # an open_clip ViT (pretrain) as CLIP tower
    )

    return str(llava_with_vision_tower(base, cfg.vision_tower))


def choose_attention(requested: str, packing: bool = False) -> str | dict[str, str]:
    """Training's attention (see ModelConfig.attn_implementation): a name, or per sub-model names when only the
    language model needs variable-length attention (the vision tower attends within each image)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

    gpu = torch.cuda.is_available()
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 but flash-attn is not installed or no GPU "
            "is visible; install the `gpu` extra or use attn_implementation=auto"
        )
    if requested == "flash_attention_4" and not (
        is_flash_attn_4_available() and torch.cuda.get_device_capability()[0] >= 9
    ):
        raise ConfigError(
            "model.attn_implementation=flash_attention_4 needs the flash-attn-4 wheel (pip install "
            "-c constraints.txt flash-attn-4, without flash-attn 2: both install flash_attn) and a "
            "Hopper or newer GPU; use attn_implementation=auto"
        )
    if requested == "flex_attention" and not gpu:
        raise ConfigError(
            "model.attn_implementation=flex_attention needs a GPU: PyTorch's FlexAttention has no "
            "backward pass on CPU; use attn_implementation=auto (SDPA)"
        )
    if requested == "auto":
        if is_flash_attn_2_available():
            return "flash_attention_2"
        requested = "flex_attention" if packing and gpu else "sdpa"
    if requested == "flex_attention":
        return {"text_config": "flex_attention", "vision_config": "sdpa"}
    return requested


def varlen(attention: str | dict[str, str]) -> bool:
    """Whether packed rows are attended sample by sample (flash-attn varlen, FlexAttention's document mask)
    rather than through a dense block-diagonal mask over the whole row (SDPA, eager)."""
    text = attention["text_config"] if isinstance(attention, dict) else attention
    return text.startswith("flash_attention") or text == "flex_attention"


def inference_attention(requested: str) -> str:
    """Answering attends with SDPA, or eager when named: option scoring's shared-prefix mask and the static KV
    cache of compiled decoding are 4-D masks, which flash-attn does not take."""
    return "eager" if requested == "eager" else "sdpa"


def load_processor(path: str, cfg: ModelConfig):
    processor = AutoProcessor.from_pretrained(path)
    # `pad` keeps the whole of a non-square scan (padded with the mean colour); a centre crop cuts it.
    processor.image_processor.do_pad = cfg.image_aspect == "pad"
    return processor


def load_model(
    path: str, cfg: ModelConfig, dtype: torch.dtype, attn: str | dict[str, str] | None = None
) -> LlavaForConditionalGeneration:
    """The LLaVA at `path`, attending with `attn` (default: as answering does, inference_attention)."""
    attn = attn or inference_attention(cfg.attn_implementation)
    # flash-attn needs half precision weights; fp32 training keeps fp32 master weights under autocast.
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    log.info("loaded %s (%s, attention=%s)", path, dtype, attn)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, which works with frozen inputs and DDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph


def num_image_tokens(model: LlavaForConditionalGeneration) -> int:
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if model.config.vision_feature_select_strategy == "full" else n


def projector_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k.split(PROJECTOR + ".", 1)[1]: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if PROJECTOR + "." in k
    }


def save_projector(model: torch.nn.Module, path: Path) -> None:
    save_file(projector_state(model), str(path))


def load_projector(model: LlavaForConditionalGeneration, path: Path) -> None:
    state = load_file(str(path))
    module = model.get_submodule(f"model.{PROJECTOR}")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: projector weights do not fit this model (missing {missing}, "
            f"unexpected {unexpected}); was it trained for another base model?"
        )


def load_for_inference(cfg: ModelConfig, checkpoint: Path | None, dtype: torch.dtype):
    """(model, processor, model_id) for the base model or a medlava checkpoint (projector/LoRA/full)."""
    base = base_model_path(cfg)
    if checkpoint is None:
        return load_model(base, cfg, dtype).eval(), load_processor(base, cfg), base
    manifest = read_manifest(checkpoint)
    kind = manifest["kind"]
    if kind == "full":
        model = load_model(str(checkpoint), cfg, dtype)
    else:
        model = load_model(manifest["base_model"], cfg, dtype)
        if kind == "projector":
            load_projector(model, checkpoint / PROJECTOR_FILE)
        elif kind == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
        else:
            raise ValueError(f"{checkpoint} holds a {kind} checkpoint, not a LLaVA one (projector, lora or full)")
    return model.eval(), load_processor(str(checkpoint), cfg), str(checkpoint)
