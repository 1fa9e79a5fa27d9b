"""Checkpoint conversions.

`convert_original`: an original LLaVA-Med v1.5 / LLaVA-1.5 checkpoint (LLaVA's `LlavaMistralForCausalLM` /
`LlavaLlamaForCausalLM`: `model.layers.*`, `model.mm_projector.{0,2}.*`, CLIP named in `mm_vision_tower`)
-> a transformers `LlavaForConditionalGeneration` checkpoint with its `LlavaProcessor`.

`apply_delta`: target = base + delta, tensor by tensor, as LLaVA's `apply_delta.py` does (the delta's
extra vocabulary rows are taken as they are; tensors only the delta has, the projector, are copied).

No library converts LLaVA's own layout (transformers' script expects the hub copies of the weights and
re-initialises added tokens randomly), so the key mapping is written here; loading, saving and the
strict shape/name check are transformers'.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from medlava.artifacts import atomic_dir
from medlava.io import InputError, atomic_write_json

log = logging.getLogger(__name__)

TEXT_CONFIGS = {"LlavaMistralForCausalLM": MistralConfig, "LlavaLlamaForCausalLM": LlamaConfig}
# LLaVA's training switches left in config.json; they mean nothing to the converted model.
LLAVA_ONLY_KEYS = {
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "use_mm_proj",
    "unfreeze_mm_vision_tower",
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
}
# Config names older transformers wrote that current configs still accept and convert.
LEGACY_TEXT_KEYS = {"rope_theta", "rope_scaling"}
STORED_TOWER = "model.vision_tower.vision_tower."
PROJECTOR_KEY = re.compile(r"^model\.mm_projector\.([02])\.(weight|bias)$")
CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT (B/32, B/16, L/14, L/14-336) uses 64-dim attention heads
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class Weights:
    """The tensors of a checkpoint directory by name, read lazily: safetensors or PyTorch .bin, one file
    or shards with an index. Nothing is loaded until asked for (safetensors and mmap'd .bin)."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{what} {self.path} is not a directory; pass a checkpoint directory")
        self._open: dict[str, object] = {}
        self.file_of = self._index(what)

    def _index(self, what: str) -> dict[str, str]:
        for name in INDEX_FILES:
            if (self.path / name).exists():
                try:
                    return dict(json.loads((self.path / name).read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise InputError(f"{self.path / name}: not a weight index ({e}); re-download it") from None
        for name in SINGLE_FILES:
            if (self.path / name).exists():
                return {k: name for k in self._handle(name).keys()}
        raise InputError(
            f"{what} {self.path} holds no weights: expected {' or '.join(SINGLE_FILES)}, or shards "
            f"with {' or '.join(INDEX_FILES)}"
        )

    def _handle(self, name: str):
        if name not in self._open:
            path = self.path / name
            if not path.exists():
                raise InputError(f"{path} is listed in the weight index but missing; the download is incomplete")
            self._open[name] = (
                safe_open(str(path), framework="pt")
                if name.endswith(".safetensors")
                else torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            )
        return self._open[name]

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def __getitem__(self, key: str) -> torch.Tensor:
        handle = self._handle(self.file_of[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]

    def files(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, name in self.file_of.items():
            out.setdefault(name, []).append(key)
        return out


def _fresh(dst: Path) -> Path:
    if dst.exists():  # checked first: a conversion reads gigabytes before it writes
        raise InputError(f"output {dst} already exists; remove it or choose another --out")
    return dst


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path} does not exist: is {path.parent} a checkpoint directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- original LLaVA -> transformers


def _check_original(cfg: dict, path: Path) -> type:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch == "LlavaForConditionalGeneration":
        raise InputError(f"{path}: already a transformers LLaVA checkpoint; use it as model.name_or_path as it is")
    if arch not in TEXT_CONFIGS:
        raise InputError(
            f"{path}: architectures {arch!r} is not an original LLaVA checkpoint ({', '.join(TEXT_CONFIGS)})"
        )
    problems = []
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(
            f"mm_projector_type={cfg.get('mm_projector_type')!r} (transformers' LLaVA projector "
            "is Linear-GELU-Linear: mlp2x_gelu)"
        )
    if cfg.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature={cfg['mm_vision_select_feature']!r} (patch or cls_patch)")
    if cfg.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end=true (image start/end tokens are LLaVA v0's; not supported)")
    if cfg.get("image_aspect_ratio", "square") not in ("pad", "square"):
        problems.append(f"image_aspect_ratio={cfg['image_aspect_ratio']!r} (anyres is LLaVA-NeXT; pad or square)")
    if not isinstance(cfg.get("mm_vision_select_layer", -2), int):
        problems.append(f"mm_vision_select_layer={cfg['mm_vision_select_layer']!r} (one layer index)")
    if problems:
        raise InputError(f"{path}: cannot convert: " + "; ".join(problems))
    return TEXT_CONFIGS[arch]


def _text_config(cls: type, cfg: dict, vocab_size: int, pad_id: int):
    accepted = set(cls().to_dict()) | LEGACY_TEXT_KEYS
    fields = {k: v for k, v in cfg.items() if k in accepted and k not in LLAVA_ONLY_KEYS and not k.startswith("mm_")}
    return cls(**{**fields, "vocab_size": vocab_size, "pad_token_id": pad_id})


def _clip_from_shapes(state: dict[str, torch.Tensor], cfg_path: Path) -> CLIPVisionConfig:
    """CLIP's config read off its stored weights; only the head count is not in a shape (see CLIP_HEAD_DIM)."""
    try:
        hidden = state["embeddings.class_embedding"].shape[0]
        patch = state["embeddings.patch_embedding.weight"].shape[-1]
        positions = state["embeddings.position_embedding.weight"].shape[0]
        intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise InputError(f"{cfg_path.parent}: the stored vision tower lacks {e}; pass --vision-tower") from None
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    side = math.isqrt(positions - 1)
    if side * side != positions - 1 or hidden % CLIP_HEAD_DIM:
        raise InputError(
            f"{cfg_path.parent}: the stored vision tower is not an OpenAI CLIP ViT "
            f"({positions} positions, hidden {hidden}); pass its checkpoint with --vision-tower"
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        image_size=side * patch,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=hidden,
    )


def _vision_tower(src: Weights, cfg: dict, vision_tower: Path | None) -> tuple[CLIPVisionConfig, dict, dict]:
    """(CLIP config, CLIP weights named as CLIPVisionModel's, image-processor settings)."""
    if vision_tower is not None:
        clip = Weights(vision_tower, "--vision-tower")
        try:
            config = CLIPVisionConfig.from_pretrained(vision_tower)  # also reads the vision part of a CLIPModel
        except (OSError, ValueError) as e:
            raise InputError(f"--vision-tower {vision_tower}: not a CLIP checkpoint ({e})") from None
        # A CLIPModel holds `vision_model.*` next to the text tower; a CLIPVisionModel may hold either naming.
        state = {
            k.split("vision_model.", 1)[-1]: clip[k]
            for k in clip.keys()
            if k.startswith("vision_model.")
            or k.split(".")[0] in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")
        }
        pre = vision_tower / "preprocessor_config.json"
        image = _read_json(pre) if pre.exists() else {}
        if any(k.startswith(STORED_TOWER) for k in src.keys()):
            log.info(
                "using the vision tower from %s, not the copy stored in %s (as LLaVA-Med's loader does)",
                vision_tower,
                src.path,
            )
        return config, state, image
    stored = {
        k[len(STORED_TOWER) :].split("vision_model.", 1)[-1]: src[k] for k in src.keys() if k.startswith(STORED_TOWER)
    }
    if not stored:
        raise InputError(
            f"{src.path} does not store its vision tower (LLaVA-Med loads {cfg.get('mm_vision_tower', 'CLIP')} "
            f"from the hub at run time). Download it (`hf download {cfg.get('mm_vision_tower', 'CLIP')} "
            "--local-dir DIR`) and pass --vision-tower DIR"
        )
    return _clip_from_shapes(stored, src.path / "config.json"), stored, {}


def _tokenizer(src: Path, text_config):
    try:  # the text config stands in for config.json, whose llava_mistral type transformers does not know
        tokenizer = AutoTokenizer.from_pretrained(src, config=text_config)
    except (OSError, ValueError, ImportError) as e:
        raise InputError(
            f"{src}: its tokenizer cannot be loaded ({e}); the checkpoint needs its tokenizer files "
            "(a tokenizer.model alone needs `pip install sentencepiece`)"
        ) from None
    added = []
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        added.append("<image>")
    # pad = eos would mask the real </s> out of the loss; LLaVA-Med's unk-as-pad is harmless and kept.
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        added.append("<pad>")
    return tokenizer, added


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows for added tokens, each the mean of the existing rows (deterministic mean-resizing)."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    return torch.cat([weight, weight.float().mean(0, keepdim=True).expand(extra, -1).to(weight.dtype)])


def original_state_dict(src: Weights, vision: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """LLaVA's names -> LlavaForConditionalGeneration's (runtime names; save_pretrained serialises them)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key in src.keys():
        if key.startswith(STORED_TOWER):
            continue  # the vision tower comes from `vision` (stored copy or --vision-tower)
        if m := PROJECTOR_KEY.match(key):
            out[f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"] = src[key]
        elif key == "lm_head.weight":
            out[key] = _grow_rows(src[key], vocab)
        elif key.startswith("model.") and not key.startswith("model.mm_projector"):
            tensor = src[key]
            out["model.language_model." + key[len("model.") :]] = (
                _grow_rows(tensor, vocab) if key == "model.embed_tokens.weight" else tensor
            )
        else:
            unknown.append(key)
    if unknown:
        raise InputError(
            f"{src.path}: tensors of no known LLaVA part: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    dtype = out["model.language_model.embed_tokens.weight"].dtype
    # One dtype for the whole model: LLaVA also ran CLIP and the projector in the LM's precision.
    out = {k: v.to(dtype) for k, v in out.items()}
    out.update({"model.vision_tower." + k: v.to(dtype) for k, v in vision.items()})
    return out


def convert_original(src: Path, dst: Path, vision_tower: Path | None = None) -> dict:
    """Write `dst`, a transformers LLaVA checkpoint + processor made from original checkpoint `src`."""
    src, dst = Path(src), _fresh(Path(dst))
    cfg = _read_json(src / "config.json")
    text_cls = _check_original(cfg, src / "config.json")
    weights = Weights(src, "original checkpoint")
    if "model.embed_tokens.weight" not in weights:
        raise InputError(
            f"{src}: no tensor model.embed_tokens.weight, so not LLaVA's layout (model.layers.*, "
            "model.mm_projector.*); is it already converted, or a different model?"
        )
    clip_config, vision, image_settings = _vision_tower(weights, cfg, Path(vision_tower) if vision_tower else None)
    if clip_config.hidden_size != cfg.get("mm_hidden_size", clip_config.hidden_size):
        raise InputError(
            f"{src / 'config.json'}: mm_hidden_size={cfg['mm_hidden_size']} but the vision tower has "
            f"hidden size {clip_config.hidden_size}; pass the CLIP it was trained with (--vision-tower)"
        )
    tokenizer, added = _tokenizer(src, text_cls())
    # Checkpoints whose embedding was padded past the tokenizer keep their rows (an added token may take one).
    vocab = max(len(tokenizer), weights["model.embed_tokens.weight"].shape[0])
    strategy = "default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full"
    n_patches = (clip_config.image_size // clip_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=clip_config,
        text_config=_text_config(text_cls, cfg, vocab, tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        image_seq_length=n_patches + (strategy == "full"),
    )
    state = original_state_dict(weights, vision, vocab)
    config.dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise InputError(
            f"{src}: the weights do not fill a LLaVA of this config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    gen_path = src / "generation_config.json"
    model.generation_config = (
        GenerationConfig.from_pretrained(src)
        if gen_path.exists()
        else GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    size = clip_config.image_size
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=image_settings.get("image_mean", OPENAI_CLIP_MEAN),
        image_std=image_settings.get("image_std", OPENAI_CLIP_STD),
        do_pad=cfg.get("image_aspect_ratio") == "pad",
    )  # pad to square with the mean colour, as LLaVA's `pad`
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=clip_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    report = {
        "source": str(src),
        "architecture": cfg["architectures"][0],
        "vision_tower": str(vision_tower) if vision_tower else "stored in the source checkpoint",
        "added_tokens": added,
        "vocab_size": vocab,
        "image_token_id": config.image_token_id,
        "image_tokens": config.image_seq_length,
        "dtype": str(config.dtype),
        "tensors": len(state),
    }
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "medlava-convert.json", report)
    return report


# ---------------------------------------------------------------- delta weights

MULTIMODAL = ("mm_projector", "vision_tower", "multi_modal_projector")
GROWABLE = ("embed_tokens.weight", "lm_head.weight")


def _apply_one(key: str, d: torch.Tensor, base: Weights, delta_path: Path) -> tuple[torch.Tensor, str]:
    """(target tensor, how it was made: added | grown | copied)."""
    if key not in base:
        if any(part in key for part in MULTIMODAL):
            return d.clone(), "copied"  # the projector (and a stored tower) exist only in the delta
        raise InputError(
            f"{delta_path}: tensor {key} has no counterpart in base {base.path}; is that the model "
            "this delta was made from (LLaVA deltas apply to the original weights in transformers "
            "format)?"
        )
    b = base[key]
    if d.shape == b.shape:
        return (d.float() + b.float()).to(d.dtype), "added"
    # Tokens added in the delta: base rows add into the first rows, the extra rows are the delta's own.
    if key.endswith(GROWABLE) and d.shape[1:] == b.shape[1:] and d.shape[0] > b.shape[0]:
        out = d.clone()
        out[: b.shape[0]] = (d[: b.shape[0]].float() + b.float()).to(d.dtype)
        return out, "grown"
    raise InputError(
        f"{key}: delta {tuple(d.shape)} and base {tuple(b.shape)} do not fit; is {base.path} the base "
        f"model of {delta_path}?"
    )


def _out_name(name: str) -> str:
    return name.replace("pytorch_model", "model").replace(".bin", ".safetensors")


def apply_delta(delta: Path, base: Path, dst: Path) -> dict:
    """Write `dst` = `base` + `delta` tensor by tensor; config, tokenizer and processor files are the delta's.
    Works shard by shard, so memory holds one delta shard and the base tensors it needs."""
    delta, base, dst = Path(delta), Path(base), _fresh(Path(dst))
    d_weights, b_weights = Weights(delta, "delta"), Weights(base, "base")
    arch = (_read_json(delta / "config.json").get("architectures") or ["?"])[0]
    skipped = sorted(set(b_weights.keys()) - set(d_weights.keys()))
    weight_files = set(d_weights.files()) | set(INDEX_FILES) | set(SINGLE_FILES)
    counts = {"added": 0, "copied": 0, "grown": 0}
    with atomic_dir(dst) as tmp:
        for item in sorted(delta.iterdir()):
            if item.is_file() and item.name not in weight_files and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        weight_map, total = {}, 0
        for name, keys in sorted(d_weights.files().items()):
            shard = {}
            for key in keys:
                tensor, kind = _apply_one(key, d_weights[key], b_weights, delta)
                shard[key] = tensor.contiguous()
                counts[kind] += 1
                total += shard[key].numel() * shard[key].element_size()
            save_file(shard, str(tmp / _out_name(name)), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, _out_name(name)))
        if len(set(weight_map.values())) > 1:
            atomic_write_json(tmp / INDEX_FILES[0], {"metadata": {"total_size": total}, "weight_map": weight_map})
    if skipped:
        log.info(
            "%d base tensors have no delta and were left out, as LLaVA's apply_delta does: %s",
            len(skipped),
            skipped[:5],
        )
    return {
        "delta": str(delta),
        "base": str(base),
        "out": str(dst),
        "architecture": arch,
        "base_tensors_left_out": skipped,
        **counts,
    }


def main(argv: list[str]) -> int:
    """`medlava convert --original SRC --out DST [--vision-tower PATH]` | `--delta DELTA --base BASE --out DST`."""
    p = argparse.ArgumentParser(prog="medlava convert", description=main.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--original", type=Path, help="original LLaVA-Med v1.5 / LLaVA-1.5 checkpoint directory")
    src.add_argument("--delta", type=Path, help="delta weights (LLaVA's apply_delta format) to add to --base")
    p.add_argument("--base", type=Path, help="with --delta: the base weights the delta was made from")
    p.add_argument(
        "--vision-tower",
        type=Path,
        help="with --original: local CLIP checkpoint (needed when the source does not store its tower)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    args = p.parse_args(argv)
    if args.delta and not args.base:
        p.error("--delta needs --base (the weights the delta was made from)")
    if args.original and args.base:
        p.error("--base goes with --delta")
    if args.delta and args.vision_tower:
        p.error("--vision-tower goes with --original; convert the delta's result with --original afterwards")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.original:
            report = convert_original(args.original, args.out, args.vision_tower)
            print(
                f"wrote {args.out}: {report['architecture']} -> LlavaForConditionalGeneration, vocab "
                f"{report['vocab_size']} (added {', '.join(report['added_tokens']) or 'nothing'}), "
                f"{report['image_tokens']} image tokens, {report['dtype']}\n"
                f"next: medlava check-model --model {args.out}"
            )
        else:
            report = apply_delta(args.delta, args.base, args.out)
            print(
                f"wrote {args.out}: {report['added']} tensors base+delta, {report['grown']} with added token rows, "
                f"{report['copied']} from the delta only"
            )
            if report["architecture"] in TEXT_CONFIGS:
                print(f"next: medlava convert --original {args.out} --out {args.out}-hf [--vision-tower CLIP_DIR]")
    except InputError as e:
        print(f"medlava convert: {e}", file=sys.stderr)
        return 2
    return 0
