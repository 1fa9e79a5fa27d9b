"""`medlava convert`: original LLaVA-Med layout -> transformers LLaVA (key mapping, logits against an independent
computation from the original weights, processor), and delta weights applied to a base (exact sums, added tokens)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from medlava.cli import main
from medlava.io import InputError
from medlava.tools.convert import apply_delta, convert_original
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

TOWER = "model.vision_tower.vision_tower.vision_model."
CLIP = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
N_PATCHES = (32 // 8) ** 2
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    hidden_act="silu",
    tie_word_embeddings=False,
)
ARCH = {
    "mistral": ("LlavaMistralForCausalLM", "llava_mistral", MistralConfig, MistralForCausalLM),
    "llama": ("LlavaLlamaForCausalLM", "llava", LlamaConfig, LlamaForCausalLM),
}
# What LLaVA-Med v1.5's config.json carries besides the Mistral fields, leftovers included.
LLAVA_KEYS = {
    "mm_hidden_size": 128,
    "mm_patch_merge_type": "flat",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "image_aspect_ratio": "pad",
    "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right",
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
    "unfreeze_mm_vision_tower": False,
    "use_mm_proj": True,
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
    "_name_or_path": "llava-med-v1.5",
}


def original_tokenizer(pad: str | None) -> PreTrainedTokenizerFast:
    """A Mistral-like tokenizer: <unk> <s> </s>, no <image>, no <pad> (pad=<unk> optionally, as LLaVA sets)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["[INST] What is shown in this scan? [/INST] a chest x-ray</s>"] * 4,
        trainer=trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=pad
    )


def write_original(
    root: Path,
    arch: str = "mistral",
    store_tower: bool = True,
    pad: str | None = None,
    extra_vocab: int = 0,
    seed: int = 0,
) -> dict:
    """An original-layout LLaVA checkpoint: two safetensors shards + index, LLaVA's config.json, tokenizer."""
    torch.manual_seed(seed)
    name, model_type, text_cls, lm_cls = ARCH[arch]
    tokenizer = original_tokenizer(pad)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra_vocab)])  # tokens a delta adds (LLaVA v0 added 3)
    vocab = len(tokenizer)
    text_cfg = text_cls(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **TEXT)
    lm = lm_cls(text_cfg)
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP))
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    state |= {
        "model.mm_projector.0.weight": torch.randn(64, 128) * 0.05,
        "model.mm_projector.0.bias": torch.randn(64),
        "model.mm_projector.2.weight": torch.randn(64, 64) * 0.1,
        "model.mm_projector.2.bias": torch.randn(64),
    }
    if store_tower:
        state |= {TOWER + k: v.clone() for k, v in clip.state_dict().items()}
    root.mkdir(parents=True)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(root / file), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    config = {
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "use_cache": True,
        **TEXT,
        **LLAVA_KEYS,
    }
    if arch == "mistral":
        config["sliding_window"] = None
    (root / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(root)
    return {"state": state, "text_cfg": text_cfg, "lm_cls": lm_cls, "clip": clip, "tokenizer": tokenizer}


def clip_checkpoint(root: Path, seed: int = 1) -> Path:
    """A CLIPModel checkpoint as on the hub (vision + text towers, preprocessor_config.json)."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        vision_config=CLIP,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
            bos_token_id=0,
            eos_token_id=1,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(root)
    (root / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": 32,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "image_mean": [0.5, 0.4, 0.3],
                "image_std": [0.25, 0.26, 0.27],
                "resample": 3,
                "size": 32,
                "feature_extractor_type": "CLIPFeatureExtractor",
            }
        )
    )
    return root


def reference_logits(
    orig: dict, clip: CLIPVisionModel, before: list[int], after: list[int], pixels: torch.Tensor
) -> torch.Tensor:
    """LLaVA's forward from the original weights, without the converter: LM and CLIP loaded by their own
    classes, projector and image splice by hand (LLaVA's prepare_inputs_labels_for_multimodal)."""
    sd = orig["state"]
    lm = orig["lm_cls"](orig["text_cfg"]).eval()
    lm.load_state_dict(
        {k: v for k, v in sd.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))}, strict=True
    )
    with torch.no_grad():
        feats = clip.eval()(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # layer -2, CLS dropped
        image = F.linear(
            F.gelu(F.linear(feats, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])),
            sd["model.mm_projector.2.weight"],
            sd["model.mm_projector.2.bias"],
        )[0]
        embed = lm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(before)), image, embed(torch.tensor(after))])[None]
        return lm(inputs_embeds=embeds).logits[0]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    orig = write_original(root / "llava-med")
    report = convert_original(root / "llava-med", root / "hf")
    return orig, root / "hf", report


def test_key_mapping_on_an_original_layout_checkpoint(mistral):
    orig, out, report = mistral
    sd = orig["state"]
    model = LlavaForConditionalGeneration.from_pretrained(out)
    conv = model.state_dict()
    v = len(orig["tokenizer"])
    mapping = {  # LLaVA's names -> transformers'
        "model.mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",
        "model.mm_projector.0.bias": "model.multi_modal_projector.linear_1.bias",
        "model.mm_projector.2.weight": "model.multi_modal_projector.linear_2.weight",
        "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
        "model.layers.1.self_attn.q_proj.weight": "model.language_model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight": "model.language_model.layers.0.mlp.down_proj.weight",
        "model.norm.weight": "model.language_model.norm.weight",
        TOWER + "embeddings.patch_embedding.weight": "model.vision_tower.embeddings.patch_embedding.weight",
        TOWER + "encoder.layers.1.mlp.fc2.bias": "model.vision_tower.encoder.layers.1.mlp.fc2.bias",
        TOWER + "post_layernorm.weight": "model.vision_tower.post_layernorm.weight",
    }
    for src, dst in mapping.items():
        assert torch.equal(conv[dst], sd[src]), src
    # Every original tensor lands somewhere exactly once; two rows (<image>, <pad>) are added to the vocabulary.
    assert len(conv) == len(sd) == report["tensors"]
    for src, dst in (
        ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ):
        assert conv[dst].shape[0] == v + 2 and torch.equal(conv[dst][:v], sd[src])
        assert torch.allclose(conv[dst][v:], sd[src].mean(0).expand(2, -1))
    matched = {k for k, t in conv.items() if any(t.shape == s.shape and torch.equal(t, s) for s in sd.values())}
    assert len(matched) == len(conv) - 2
    c = model.config
    assert (c.image_token_id, c.pad_token_id, c.text_config.vocab_size) == (v, v + 1, v + 2)
    assert c.vision_feature_layer == -2 and c.vision_feature_select_strategy == "default"
    assert c.text_config.rope_parameters["rope_theta"] == 1e6 and c.text_config.model_type == "mistral"
    assert (c.vision_config.num_attention_heads, c.vision_config.image_size, c.vision_config.patch_size) == (2, 32, 8)
    assert report["added_tokens"] == ["<image>", "<pad>"] and report["image_tokens"] == N_PATCHES
    assert not hasattr(c.text_config, "tune_mm_mlp_adapter")  # LLaVA's leftovers are dropped


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_converted_logits_equal_the_original_computed_independently(tmp_path, arch):
    if arch == "mistral":  # tower stored in the checkpoint, its config read off the weights
        orig = write_original(tmp_path / "orig", "mistral")
        convert_original(tmp_path / "orig", tmp_path / "hf")
        clip = orig["clip"]
    else:  # LLaVA-1.5 layout, tower not stored: CLIP from a hub-style CLIPModel dir; pad=<unk> is kept
        orig = write_original(tmp_path / "orig", "llama", store_tower=False, pad="<unk>")
        clip_dir = clip_checkpoint(tmp_path / "clip")
        convert_original(tmp_path / "orig", tmp_path / "hf", vision_tower=clip_dir)
        clip = CLIPVisionModel.from_pretrained(clip_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image_id = model.config.image_token_id
    before, after = [1, 40, 41, 42], [50, 51, 2, 60]
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([before + [image_id] * N_PATCHES + after]), pixel_values=pixels).logits[0]
    want = reference_logits(orig, clip, before, after, pixels)
    v = len(orig["tokenizer"])
    assert got.shape == (len(before) + N_PATCHES + len(after), model.config.text_config.vocab_size)
    torch.testing.assert_close(got[:, :v], want, rtol=1e-5, atol=1e-5)
    assert model.config.text_config.vocab_size == v + (1 if arch == "llama" else 2)


def test_converted_processor_pads_to_square_and_expands_the_image(mistral):
    orig, out, _ = mistral
    processor = AutoProcessor.from_pretrained(out)
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    pixels = processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    # `pad`: the band above and below the image is the mean colour, i.e. ~0 after normalisation; a crop has none.
    assert pixels[:, :10].abs().max() < 0.02 and pixels[:, 13:19].abs().min() > 0.5
    enc = processor(text="[INST] <image>\nWhat is shown in this scan? [/INST]", images=[wide], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == N_PATCHES
    text = [i for i in ids if i != image_id]
    tok = orig["tokenizer"]
    assert (
        text
        == tok("[INST] ", add_special_tokens=False)["input_ids"]
        + tok("\nWhat is shown in this scan? [/INST]", add_special_tokens=False)["input_ids"]
    )


def test_missing_vision_tower_is_refused_with_the_fix(tmp_path, capsys):
    write_original(tmp_path / "orig", store_tower=False)
    with pytest.raises(InputError, match=r"does not store its vision tower.*--vision-tower DIR"):
        convert_original(tmp_path / "orig", tmp_path / "hf")
    assert main(["convert", "--original", str(tmp_path / "orig"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "hf download openai/clip-vit-large-patch14-336" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))  # nothing half-written


def test_bad_sources_are_refused_naming_the_file(tmp_path, mistral):
    _, out, _ = mistral
    with pytest.raises(InputError, match="already a transformers LLaVA checkpoint"):
        convert_original(out, tmp_path / "x")
    write_original(tmp_path / "orig")
    with pytest.raises(InputError, match="already exists"):
        convert_original(tmp_path / "orig", out)
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    (tmp_path / "orig" / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    with pytest.raises(InputError, match=r"config.json: cannot convert: mm_projector_type='linear'"):
        convert_original(tmp_path / "orig", tmp_path / "x")
    with pytest.raises(InputError, match="config.json does not exist"):
        convert_original(tmp_path / "nowhere", tmp_path / "x")


# ---------------------------------------------------------------- delta


def write_bin_shards(root: Path, state: dict[str, torch.Tensor]) -> None:
    """As LLaVA's released deltas: pytorch_model-0000i-of-00002.bin + index."""
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for file, ks in shards.items():
        torch.save({k: state[k] for k in ks}, root / file)
    (root / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )


def test_delta_gives_base_plus_delta_exactly_with_added_tokens(tmp_path):
    # Base: the plain LM in transformers format (LLaVA's deltas apply to LLaMA/Mistral weights).
    torch.manual_seed(3)
    v_base = len(original_tokenizer(None))
    base_lm = MistralForCausalLM(MistralConfig(vocab_size=v_base, **TEXT))
    base_lm.save_pretrained(tmp_path / "base")
    base = load_file(tmp_path / "base" / "model.safetensors")
    # Target: an original-layout LLaVA with 3 tokens added; its delta = target - base on the shared rows.
    target = write_original(tmp_path / "target", extra_vocab=3, seed=4)["state"]
    delta = {}
    for k, t in target.items():
        if k in base:
            d = t.clone()
            d[: base[k].shape[0]] -= base[k]
            delta[k] = d
        else:
            delta[k] = t.clone()
    (tmp_path / "delta").mkdir()
    write_bin_shards(tmp_path / "delta", delta)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "delta" / f).write_bytes((tmp_path / "target" / f).read_bytes())

    assert (
        main(
            [
                "convert",
                "--delta",
                str(tmp_path / "delta"),
                "--base",
                str(tmp_path / "base"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out_files == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    out = load_file(tmp_path / "out" / "model-00001-of-00002.safetensors") | load_file(
        tmp_path / "out" / "model-00002-of-00002.safetensors"
    )
    assert set(out) == set(delta)
    for k, d in delta.items():
        if k not in base:  # projector and stored tower: the delta's own tensors
            assert torch.equal(out[k], d), k
        elif d.shape == base[k].shape:
            assert torch.equal(out[k], base[k] + d), k
        else:  # embed_tokens / lm_head: 3 added rows taken as they are
            n = base[k].shape[0]
            assert d.shape[0] == n + 3 and torch.equal(out[k][:n], base[k] + d[:n]) and torch.equal(out[k][n:], d[n:])
        torch.testing.assert_close(out[k], target[k], rtol=0, atol=1e-6)
    # The result is an original-layout LLaVA checkpoint: it converts and loads.
    convert_original(tmp_path / "out", tmp_path / "hf")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert torch.equal(model.lm_head.weight[: v_base + 3], out["lm_head.weight"])


def test_delta_in_transformers_layout_loads_as_base_plus_delta(tmp_path):
    orig = write_original(tmp_path / "orig")
    convert_original(tmp_path / "orig", tmp_path / "base")
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    delta = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn_like(p) * 0.01)
    delta.save_pretrained(tmp_path / "delta")
    apply_delta(tmp_path / "delta", tmp_path / "base", tmp_path / "out")
    got = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    b, d = base.state_dict(), delta.state_dict()
    assert set(got) == set(b) and len(got) == len(orig["state"])
    assert all(torch.equal(got[k], b[k] + d[k]) for k in got)


def test_delta_against_the_wrong_base_is_refused(tmp_path):
    write_original(tmp_path / "delta")
    torch.manual_seed(0)
    MistralForCausalLM(
        MistralConfig(vocab_size=len(original_tokenizer(None)), **{**TEXT, "intermediate_size": 96})
    ).save_pretrained(tmp_path / "base")
    shapes = r"model.layers.0.mlp.\w+_proj.weight: delta \(\d+, \d+\) and base \(\d+, \d+\) do not fit"
    with pytest.raises(InputError, match=shapes):
        apply_delta(tmp_path / "delta", tmp_path / "base", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="base .*empty holds no weights"):
        apply_delta(tmp_path / "delta", tmp_path / "empty", tmp_path / "out")


def test_converted_checkpoint_passes_check_model(mistral):
    """The converted directory is what model.name_or_path takes: medlava's loaders read it as the stages do."""
    from medlava.tools.check_model import check_model, config_for_model

    orig, out, _ = mistral
    lines: list[str] = []
    report = check_model(config_for_model(str(out), ["sft.lora.r=8"]), "sft", out=lines.append)
    clip_params = sum(v.numel() for k, v in orig["state"].items() if k.startswith(TOWER))
    assert report.counts["vision tower"] == {"trainable": 0, "frozen": clip_params}
    assert len(report.image_positions) == N_PATCHES and report.loss > 0
