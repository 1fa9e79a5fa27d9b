"""What the benchmarks share: random-initialised models of real checkpoints' shapes (no hub download needed),
their parameter counts, and the matmul rate a device reaches."""

from __future__ import annotations

import time

import torch
from medlava.config import TinyModelConfig
from medlava.models.tiny import build_tokenizer, llava_config

# Dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's datasheet, without sparsity): the MFU denominator.
HOPPER_BF16_PEAK = 989.4e12


def llava_med_v15(layers: int | None, device: torch.device, dtype: torch.dtype):
    """LLaVA-Med v1.5's shapes: CLIP ViT-L/14-336 + 2-layer GELU projector + Mistral-7B (32 layers, 4096 wide,
    GQA 32/8, 14336 MLP, 32k vocabulary); `layers` shortens both stacks. Returns (model, tokenizer, image size)."""
    from transformers import LlavaForConditionalGeneration

    shapes = TinyModelConfig(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=layers or 24,
        vision_heads=16,
        text_hidden=4096,
        text_layers=layers or 32,
        text_heads=32,
        text_kv_heads=8,
        text_intermediate=14336,
    )
    tok = build_tokenizer(512)
    config = llava_config(shapes, tok, vocab=32000)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return model.eval(), tok, 336


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lm_params(model: torch.nn.Module) -> int:
    """Language-model parameters that do matmul work per token (input embeddings are a lookup)."""
    lm = model.get_submodule("model.language_model")
    return params(lm) + params(model.get_submodule("lm_head")) - lm.embed_tokens.weight.numel()


def vision_params(model: torch.nn.Module) -> tuple[int, int]:
    """(vision tower, projector) parameters."""
    return params(model.get_submodule("model.vision_tower")), params(model.get_submodule("model.multi_modal_projector"))


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s this device reaches in `dtype` (the denominator of the compute floor)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if device.type == "cuda" else 5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)
