"""open_clip models for `pretrain`: built from an open_clip config (its built-ins, medlava's own in
model_configs/, or a local open_clip directory), optionally with a local transformers text tower; saved in
open_clip's `local-dir:` layout (open_clip_config.json + open_clip_model.safetensors, plus the text tower's
config.json and tokenizer files), the layout BiomedCLIP's repository uses too."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import torch
from open_clip.model import (
    CLIP,
    CustomTextCLIP,
    get_model_preprocess_cfg,
    set_model_preprocess_cfg,
)
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from safetensors.torch import load_file, save_file

from medlava.config import ConfigError, PretrainConfig
from medlava.io import atomic_write_json

open_clip.add_model_config(Path(__file__).with_name("model_configs"))  # `medlava-tiny-clip` becomes a name
OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
WEIGHT_FILES = (WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
LOCAL_DIR = "local-dir:"
# BiomedCLIP's text tower settings (PubMedBERT, CLS token, MLP projection, 256 tokens).
HF_TEXT = {"hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}


def read_local_dir(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of an open_clip directory."""
    f = Path(path) / OPEN_CLIP_CONFIG
    if not f.is_file():
        raise FileNotFoundError(
            f"{path} holds no {OPEN_CLIP_CONFIG}: give an open_clip model directory (a pretrain "
            "checkpoint, or a local copy of an open_clip hub model such as BiomedCLIP)"
        )
    data = json.loads(f.read_text())
    if "model_cfg" not in data:
        raise FileNotFoundError(f"{f} has no `model_cfg`; it is not an open_clip model config")
    return data["model_cfg"], data.get("preprocess_cfg", {})


def weights_file(path: Path) -> Path | None:
    return next((Path(path) / n for n in WEIGHT_FILES if (Path(path) / n).is_file()), None)


def model_config(p: PretrainConfig) -> dict:
    """The open_clip model_cfg that pretrain.model (a config name), text_tower and context_length describe."""
    cfg = open_clip.get_model_config(p.model)
    if cfg is None:
        raise ConfigError(
            f"pretrain.model={p.model} is not an open_clip model config; use one of "
            f"open_clip.list_models() (e.g. ViT-B-16, medlava-tiny-clip) or {LOCAL_DIR}PATH"
        )
    cfg = copy.deepcopy(cfg)
    if "multimodal_cfg" in cfg:
        raise ConfigError(
            f"pretrain.model={p.model} is a CoCa model (captioning decoder); pretrain trains "
            "contrastive CLIP models only"
        )
    if p.text_tower:
        tower = Path(p.text_tower)
        if not (tower / "config.json").is_file():
            raise FileNotFoundError(
                f"pretrain.text_tower={tower} holds no config.json: give a local transformers "
                "model directory with its tokenizer (e.g. PubMedBERT saved with save_pretrained)"
            )
        cfg["text_cfg"] = {**HF_TEXT, "hf_model_name": str(tower), "hf_tokenizer_name": str(tower)}
    if p.context_length:
        cfg["text_cfg"]["context_length"] = p.context_length
    return cfg


def build_clip(cfg: dict, pre: dict, pretrained_text: bool) -> CLIP | CustomTextCLIP:
    """An open_clip model from its config dict, random-initialised except a transformers text tower, whose
    weights come from its directory when `pretrained_text`."""
    cfg = copy.deepcopy(cfg)
    text = cfg["text_cfg"]
    hf = "hf_model_name" in text
    if hf:
        text["hf_model_pretrained"] = pretrained_text
    custom = cfg.pop("custom_text", False) or hf
    model = (CustomTextCLIP if custom else CLIP)(**cfg)
    size = model.visual.image_size if hasattr(model.visual, "image_size") else cfg["vision_cfg"]["image_size"]
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(size=size), pre))
    return model


def tokenizer_for(cfg: dict, source: Path | str | None = None) -> HFTokenizer | SimpleTokenizer:
    """open_clip's tokenizer of the config: the text tower's own (from `source` when given), else CLIP's BPE."""
    text = cfg["text_cfg"]
    n = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        return HFTokenizer(str(source or text["hf_tokenizer_name"]), context_length=n)
    return SimpleTokenizer(context_length=n)


def image_transform(model: torch.nn.Module):
    """open_clip's evaluation transform (resize, centre crop, normalise), for training too: a deterministic
    view of every image keeps a resumed or multi-process run the same as one uninterrupted run."""
    return image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(model)), is_train=False)


class ClipModule(torch.nn.Module):
    """The open_clip model with the config it was built from; `save_pretrained` writes the local-dir layout,
    so medlava.train.checkpoint saves it as it saves a transformers model."""

    def __init__(self, clip: torch.nn.Module, cfg: dict, tokenizer):
        super().__init__()
        self.clip, self.cfg, self.tokenizer = clip, cfg, tokenizer

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        return self.clip(image, text)

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        atomic_write_json(
            path / OPEN_CLIP_CONFIG, {"model_cfg": self.cfg, "preprocess_cfg": get_model_preprocess_cfg(self.clip)}
        )
        save_file({k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}, str(path / WEIGHTS))
        text = getattr(self.clip, "text", None)
        if hasattr(text, "config"):  # a transformers tower: its config, so the directory loads on its own
            text.config.save_pretrained(path)


class TokenizerFiles:
    """What medlava.train.checkpoint calls `processor`: the tokenizer files a checkpoint carries."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def save_pretrained(self, path: Path) -> None:
        if isinstance(self.tokenizer, HFTokenizer):
            self.tokenizer.save_pretrained(path)


def create(p: PretrainConfig) -> ClipModule:
    """The model pretrain starts from: a new one (its text tower's weights loaded), or an open_clip directory."""
    if p.model.startswith(LOCAL_DIR):
        if p.text_tower or p.context_length:
            raise ConfigError(
                f"pretrain.model={p.model} continues that model as it is: drop pretrain.text_tower "
                "and pretrain.context_length"
            )
        return load_clip(Path(p.model[len(LOCAL_DIR) :]))
    cfg = model_config(p)
    return ClipModule(build_clip(cfg, {}, pretrained_text=True), cfg, tokenizer_for(cfg))


def load_clip(path: Path) -> ClipModule:
    """A saved open_clip directory (a pretrain checkpoint or a local BiomedCLIP-style copy), weights loaded."""
    path = Path(path)
    cfg, pre = read_local_dir(path)
    own_text = (path / "config.json").is_file() and "hf_model_name" in cfg["text_cfg"]
    if own_text:
        cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_name": str(path)}}
    clip = build_clip(cfg, pre, pretrained_text=False)
    weights = weights_file(path)
    if weights is None:
        raise FileNotFoundError(f"{path} holds none of {', '.join(WEIGHT_FILES)}")
    if weights.suffix == ".safetensors":
        clip.load_state_dict(load_file(str(weights)))
    else:
        open_clip.load_checkpoint(clip, str(weights))
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    return ClipModule(clip.eval(), cfg, tokenizer_for(cfg, path if has_tokenizer else None))
