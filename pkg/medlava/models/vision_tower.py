"""An open_clip ViT as transformers' CLIPVisionModel, weight for weight, and a LLaVA checkpoint with it as the vision
tower (`model.vision_tower`), which every stage then loads as it loads OpenAI's CLIP tower.

The two are the same network (conv patch embedding without bias, class token, learned positions, pre-LayerNorm,
pre-norm blocks with fused-qkv attention, GELU or QuickGELU MLP, post-LayerNorm on the class token); open_clip
options without a CLIPVisionModel counterpart (timm trunks, layer scale, attentional pooling, no pre-norm, qk norm,
...) are refused, never approximated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import VisionTransformer
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from medlava.artifacts import atomic_dir, checkpoint_of
from medlava.io import InputError
from medlava.models.clip import OPEN_CLIP_CONFIG, ClipModule, load_clip, weights_file
from medlava.runs import is_complete

log = logging.getLogger(__name__)
# open_clip ViT options CLIPVisionModel cannot express, with the value that it can.
_EXACT_ONLY = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
}


def _square(value, what: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise InputError(f"{where}: {what} {list(value)} is not square; CLIPVisionModel needs a square one")
        value = value[0]
    return int(value)


def clip_vision_config(model_cfg: dict, where: str) -> CLIPVisionConfig:
    """The CLIPVisionConfig of an open_clip model config's ViT; InputError naming what cannot be mapped exactly."""
    v = model_cfg["vision_cfg"]
    if v.get("timm_model_name"):
        raise InputError(
            f"{where}: the vision tower is a timm trunk ({v['timm_model_name']}, as BiomedCLIP's), whose "
            "blocks and norms have no exact CLIPVisionModel counterpart; medlava does not approximate "
            "it. Pretrain an open_clip ViT (pretrain.model=ViT-B-16) and use that checkpoint"
        )
    c = CLIPVisionCfg(**v)
    if isinstance(c.layers, (list, tuple)):
        raise InputError(f"{where}: the vision tower is a ResNet (layers {list(c.layers)}), not a ViT")
    unmappable = {k: getattr(c, k) for k, ok in _EXACT_ONLY.items() if getattr(c, k) != ok}
    if c.block_type not in (None, "default"):
        unmappable["block_type"] = c.block_type
    norm = dict(c.norm_kwargs or {})
    eps = norm.pop("eps", 1e-5)
    if norm:
        unmappable["norm_kwargs"] = c.norm_kwargs
    if unmappable:
        raise InputError(
            f"{where}: vision_cfg options {unmappable} have no CLIPVisionModel counterpart; medlava "
            "converts only plain CLIP ViTs exactly and does not approximate others"
        )
    if c.width % c.head_width:
        raise InputError(f"{where}: vision width {c.width} is not a multiple of head_width {c.head_width}")
    return CLIPVisionConfig(
        hidden_size=c.width,
        intermediate_size=int(c.width * c.mlp_ratio),
        num_hidden_layers=c.layers,
        num_attention_heads=c.width // c.head_width,
        image_size=_square(c.image_size, "image_size", where),
        patch_size=_square(c.patch_size, "patch_size", where),
        layer_norm_eps=eps,
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        projection_dim=model_cfg["embed_dim"],
    )


def convert_state(visual: VisionTransformer) -> dict[str, torch.Tensor]:
    """open_clip VisionTransformer weights under CLIPVisionModel's names (fused qkv split into q, k, v)."""
    s = visual.state_dict()
    out = {
        "embeddings.patch_embedding.weight": s["conv1.weight"],
        "embeddings.class_embedding": s["class_embedding"],
        "embeddings.position_embedding.weight": s["positional_embedding"],
    }
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        out |= {f"{ours}.weight": s[f"{theirs}.weight"], f"{ours}.bias": s[f"{theirs}.bias"]}
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", s[f"{src}attn.in_proj_{kind}"].chunk(3)):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = part
            for ours, theirs in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[f"{dst}{ours}.{kind}"] = s[f"{src}{theirs}.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def to_clip_vision_model(model: ClipModule, where: str) -> CLIPVisionModel:
    config = clip_vision_config(model.cfg, where)
    if not isinstance(model.clip.visual, VisionTransformer):
        raise InputError(f"{where}: the vision tower is {type(model.clip.visual).__name__}, not an open_clip ViT")
    vision = CLIPVisionModel(config)
    vision.load_state_dict(convert_state(model.clip.visual), strict=True)
    return vision.eval()


def open_clip_dir(path: Path) -> Path:
    """The open_clip directory `path` names: itself, or a complete pretrain run's checkpoint."""
    path = Path(path)
    if (path / OPEN_CLIP_CONFIG).is_file():
        return path
    if is_complete(path):
        return checkpoint_of(path)
    raise FileNotFoundError(
        f"model.vision_tower={path} is neither an open_clip model directory (no "
        f"{OPEN_CLIP_CONFIG}) nor a complete pretrain run"
    )


def llava_with_vision_tower(base: str, tower: str | os.PathLike) -> Path:
    """A LLaVA checkpoint: `base` with the open_clip ViT at `tower` as its vision tower (and the image processor
    set to that model's size and normalisation), written once into the cache, keyed by both. The projector keeps
    the base's weights when the width matches and starts fresh otherwise: train it with align."""
    from medlava.models.tiny import cache_root

    source = open_clip_dir(Path(tower))
    weights = weights_file(source)
    stamp = [
        str(source.resolve()),
        base,
        weights.stat().st_size if weights else 0,
        weights.stat().st_mtime_ns if weights else 0,
    ]
    path = cache_root() / "llava-vision-tower" / hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]
    if (path / "config.json").exists():
        return path
    clip = load_clip(source)
    vision = to_clip_vision_model(clip, str(source))
    config = LlavaConfig.from_pretrained(base)
    config.vision_config = vision.config
    model = LlavaForConditionalGeneration.from_pretrained(
        base, config=config, ignore_mismatched_sizes=True, dtype="auto"
    )
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    processor = AutoProcessor.from_pretrained(base)
    pre, size = clip.clip.visual.preprocess_cfg, vision.config.image_size
    processor.image_processor.size = {"shortest_edge": size}
    processor.image_processor.crop_size = {"height": size, "width": size}
    processor.image_processor.image_mean, processor.image_processor.image_std = list(pre["mean"]), list(pre["std"])
    processor.patch_size = vision.config.patch_size
    with atomic_dir(path, exists="keep") as tmp:  # another process may finish the same checkpoint first
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "medlava_vision_tower.json").write_text(json.dumps({"base": base, "vision_tower": str(source)}) + "\n")
    log.info("LLaVA %s with the vision tower of %s -> %s", base, source, path)
    return path
