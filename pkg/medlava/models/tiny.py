"""A tiny random-initialised LLaVA checkpoint written to disk, so every stage loads it exactly like
`microsoft/llava-med-v1.5-mistral-7b`: the tiny model is a size, not a fake.

Architecture as LLaVA-Med v1.5 (CLIP vision tower, 2-layer GELU projector, Mistral LM, feature layer -2,
CLS dropped); the tokenizer is a byte-level BPE trained here on a fixed corpus because no hub download
is possible, with LLaVA-Med's special tokens (`<s>`, `</s>`, `<unk>`) plus `<image>` and `<pad>`, and `<s>` put
in front of a text as Mistral's tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from medlava.artifacts import atomic_dir
from medlava.config import TinyModelConfig

FORMAT = 2  # of what build_tiny makes; part of the cache key, so a change rebuilds cached checkpoints
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Words the tiny tokenizer should hold whole: templates, the HAM10000 question and class names.
_CORPUS = [
    "[INST] <image>\nWhat is the lesion type? Choose one of: akiec, bcc, bkl, df, mel, nv, vasc. [/INST] nv</s>",
    "USER: <image>\nWhat is the lesion type? ASSISTANT: mel</s>",
    "A chat between a curious human and an artificial intelligence assistant.",
    "akiec bcc bkl df mel nv vasc actinic keratosis basal cell carcinoma benign keratosis dermatofibroma "
    "melanoma melanocytic nevus vascular lesion yes no not the a an of in on with left right lung liver "
    "heart chest x-ray ct mri findings impression normal abnormal effusion pneumothorax cardiomegaly",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ? ! ' \" ( ) [ ] - / \n",
]


def cache_root() -> Path:
    return Path(os.environ.get("MEDLAVA_CACHE", Path.home() / ".cache" / "medlava"))


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Like Mistral's tokenizer (add_bos_token), a text encodes as <s> + its tokens: LLaVA's tokenizer_image_token
    # and loss masks count on it.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=2048,
    )


def llava_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, vocab: int | None = None) -> LlavaConfig:
    """LLaVA-Med v1.5's architecture (CLIP vision tower, GELU projector, Mistral LM) at `cfg`'s shapes, for
    `tokenizer`; `vocab` (default: the tokenizer's size) is the embedding size."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = MistralConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=4096,
        rope_theta=1e6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny(cfg: TinyModelConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = build_tokenizer(cfg.vocab_size)
    config = llava_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    # At hidden size 64 the default init (std 0.02) gives an output head whose logits span ~±0.5, so a
    # frozen head (LoRA) could never make an answer likely; a trained LM's head has a wide logit range.
    torch.nn.init.normal_(model.lm_head.weight, std=cfg.head_init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_pad=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def tiny_checkpoint(cfg: TinyModelConfig) -> Path:
    """Path of the tiny checkpoint for `cfg`, written (atomically) on first use; keyed by the config."""
    key = hashlib.sha256(json.dumps({**cfg.model_dump(), "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / "tiny-llava" / key
    if (path / "config.json").exists():
        return path
    model, processor = build_tiny(cfg)
    with atomic_dir(path, exists="keep") as tmp:  # another process may finish the same checkpoint first
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return path
