"""What the benchmarks share: random-initialised models of real checkpoints' shapes (no hub download needed),
their parameter counts, and the matmul rate a device reaches."""

from __future__ import annotations

import time

import torch
from medlava.models.tiny import build_tokenizer

# Dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's datasheet, without sparsity): the MFU denominator.
HOPPER_BF16_PEAK = 989.4e12


def llava_med_v15(layers: int | None, device: torch.device, dtype: torch.dtype):
    """LLaVA-Med v1.5's shapes: CLIP ViT-L/14-336 + 2-layer GELU projector + Mistral-7B (32 layers, 4096 wide,
    GQA 32/8, 14336 MLP, 32k vocabulary); `layers` shortens both stacks. Returns (model, tokenizer, image size)."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    tok = build_tokenizer(512)
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers or 24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers or 32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
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
