"""What makes a built LLaVA train faster without changing what it computes: Liger's fused kernels
(`kernels=liger`) and per-block torch.compile (`compile=true`). Both act in place and keep every module name, so
LoRA, DDP, checkpoints and exact resume see the same model."""

from __future__ import annotations

from importlib.metadata import version

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from medlava.config import ConfigError

# The language models of the LLaVAs medlava trains (LLaVA-Med v1.5: Mistral; LLaVA-1.5: Llama/Vicuna), both
# covered by liger_kernel.transformers.apply_liger_kernel_to_llava; Liger has no CLIP kernels.
LIGER_TEXT_MODELS = ("mistral", "llama")
LIGER_PATCHES = ["rms_norm", "swiglu", "rope", "fused_linear_cross_entropy"]


def check_kernels(kernels: str, device: torch.device, section: str) -> None:
    """Refuse `<section>.kernels` before the run starts where it cannot run: Liger's kernels are Triton GPU code."""
    if kernels != "liger":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"{section}.kernels=liger needs a CUDA GPU (Liger's kernels are Triton GPU kernels) but this "
            f"process runs on {device.type}; set {section}.kernels=none"
        )
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{section}.kernels=liger needs liger-kernel: pip install -c constraints.txt '.[gpu]', "
            f"or set {section}.kernels=none"
        ) from None


def apply_liger(model: torch.nn.Module, section: str) -> dict:
    """Liger's LLaVA patch on `model` (before LoRA wraps it): fused RMSNorm, SwiGLU and RoPE in the language model
    and a fused linear cross-entropy on the LLaVA head, which never materialises the logits in training. What it
    patched, for train_info.json."""
    cfg = model.config
    text = cfg.text_config.model_type
    if cfg.model_type != "llava" or text not in LIGER_TEXT_MODELS:
        raise ConfigError(
            f"{section}.kernels=liger covers LLaVA with a {' or '.join(LIGER_TEXT_MODELS)} language "
            f"model; this model is {cfg.model_type} with {text}: set {section}.kernels=none"
        )
    from liger_kernel.transformers import apply_liger_kernel_to_llava

    # Liger swaps the Mistral/Llama module's RMSNorm, MLP and rotary functions for the whole process, and the
    # instance's own modules and forward: every model this process builds afterwards is patched too.
    apply_liger_kernel_to_llava(model=model, fused_linear_cross_entropy=True, rope=True, rms_norm=True, swiglu=True)
    return {
        "name": "liger",
        "version": version("liger-kernel"),
        "language_model": text,
        "patched": LIGER_PATCHES,
        "vision_tower": f"{cfg.vision_config.model_type} (no Liger kernels; unchanged)",
    }


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every transformer block (the language model's decoder layers, the vision tower's encoder
    layers) in place, as torchtune does: small graphs that all layers share, compiled once per input shape
    family, with activation checkpointing wrapped around them. Returns how many blocks."""
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks:
        block.compile()
    return len(blocks)
