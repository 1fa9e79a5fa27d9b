"""Training at the GPU's limit without changing what it computes: the attention packing gets, Liger's fused kernels,
per-block torch.compile and fused AdamW; each refused, with the fix, where it cannot run."""

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers.utils
from conftest import TINY
from medlava.cli import main
from medlava.config import ConfigError, load_config
from medlava.distributed import Dist
from medlava.models.inputs import collate
from medlava.models.kernels import apply_liger, check_kernels
from medlava.models.llava import choose_attention, num_image_tokens, varlen
from medlava.models.templates import encode, render
from medlava.train.vlm import build_model
from transformers import LlavaConfig

CPU = torch.device("cpu")
FLEX = {"text_config": "flex_attention", "vision_config": "sdpa"}


def test_packing_attends_sample_by_sample_where_the_machine_can(monkeypatch):
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_attention("auto", packing=True) == FLEX  # a GPU without flash-attn: FlexAttention's document mask
    assert choose_attention("auto") == "sdpa" and varlen(FLEX) and not varlen("sdpa")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert choose_attention("auto", packing=True) == "flash_attention_2" and varlen("flash_attention_2")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_attention("auto", packing=True) == "sdpa"  # CPU: the dense document mask (a warning says so)
    with pytest.raises(ConfigError, match="FlexAttention has no backward pass on CPU"):
        choose_attention("flex_attention", packing=True)
    with pytest.raises(ConfigError, match="flash-attn is not installed or no GPU"):
        choose_attention("flash_attention_2")
    with pytest.raises(ConfigError, match="needs the flash-attn-4 wheel"):
        choose_attention("flash_attention_4")


def test_liger_is_refused_where_it_cannot_run(tmp_path, capsys):
    check_kernels("none", CPU, "sft")
    with pytest.raises(ConfigError, match="sft.kernels=liger needs a CUDA GPU .* runs on cpu; set sft.kernels=none"):
        check_kernels("liger", CPU, "sft")
    qwen = SimpleNamespace(config=LlavaConfig(text_config={"model_type": "qwen2"}))
    with pytest.raises(
        ConfigError,
        match="covers LLaVA with a mistral or llama language model; this model is llava "
        "with qwen2: set align.kernels=none",
    ):
        apply_liger(qwen, "align")
    for key in ("kernels=liger", "compile=true"):
        with pytest.raises(ConfigError, match="cannot run under ZeRO-3.*use deepspeed=zero2 or none"):
            load_config(TINY, ["sft.deepspeed=zero3", f"sft.{key}"])
    # The stage refuses before it makes a run directory.
    assert main(["sft", "--config", str(TINY), f"output_root={tmp_path}", "sft.kernels=liger"]) == 2
    assert "sft.kernels=liger needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    """The sft stage's LoRA model of the tiny recipe, built plainly and with sft.compile=true."""
    import os

    os.environ.setdefault("MEDLAVA_CACHE", str(tmp_path_factory.mktemp("cache")))
    built = {}
    for compile in (False, True):
        cfg = load_config(TINY, ["sft.init_from=none", f"sft.compile={str(compile).lower()}"])
        built[compile] = build_model(cfg, "sft", Dist(0, 1, 0, CPU), None)
    return built


def _batch(built):
    tok = built.processor.tokenizer
    items = []
    for i, answer in enumerate(["nv", "a melanocytic nevus with a regular border"]):
        conv = [{"from": "human", "value": "<image>\nWhat is the lesion type?"}, {"from": "gpt", "value": answer}]
        enc = encode(
            render("mistral_instruct", conv),
            tok,
            tok.convert_tokens_to_ids("<image>"),
            num_image_tokens(built.model),
            256,
        )
        items.append(
            {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "pixel_values": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)),
            }
        )
    return collate(items, tok.pad_token_id)


def _loss_and_grads(model, batch):
    model.train().zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_train_to_the_eager_loss_and_gradients(lora_models):
    """sft.compile=true: every decoder and vision encoder layer compiled (inductor), the same loss and gradients."""
    eager, compiled = lora_models[False], lora_models[True]
    assert (eager.speedups, compiled.speedups) == (
        {"kernels": "none", "compiled_blocks": 0},
        {"kernels": "none", "compiled_blocks": 4},
    )
    for name, p in eager.model.named_parameters():  # B starts at zero, which would leave A without a gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    compiled.model.load_state_dict(eager.model.state_dict())  # module names unchanged by compiling
    batch = _batch(eager)
    want_loss, want = _loss_and_grads(eager.model, batch)
    torch._dynamo.utils.counters.clear()
    got_loss, got = _loss_and_grads(compiled.model, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # a decoder and a vision encoder layer
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert len(want) == 2 * 2 * 7 + 4 == len(got)  # LoRA A and B of 7 projections x 2 layers, the projector's 4
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_kernels_train_to_the_plain_loss_and_gradients_on_the_gpu(lora_models):
    """kernels=liger on the sft LoRA model in bf16: loss and gradients within bf16 rounding of the plain model's."""
    pytest.importorskip("liger_kernel")
    plain = lora_models[False]
    model = copy.deepcopy(plain.model).to("cuda", torch.bfloat16)
    batch = {k: v.cuda() for k, v in _batch(plain).items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    want_loss, want = _loss_and_grads(model, batch)
    liger = copy.deepcopy(plain.model)
    record = apply_liger(liger.base_model.model, "sft")  # in place, as build_model applies it before LoRA wraps
    assert record["patched"] == ["rms_norm", "swiglu", "rope", "fused_linear_cross_entropy"]
    liger = liger.to("cuda", torch.bfloat16)
    assert liger.train()(**batch, use_cache=False).logits is None  # the fused loss never materialised them
    got_loss, got = _loss_and_grads(liger, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=5e-2, atol=5e-3, msg=name)
