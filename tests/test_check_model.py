"""`medlava check-model` on the tiny preset: counts equal a manual count, the loss mask it prints is the
collator's, its generation is the model's, the memory formula's numbers, and failures exit non-zero."""

import json
import os
import re

import pytest
import torch
from conftest import TINY
from medlava.config import load_config
from medlava.models.inputs import Encoder, collate
from medlava.models.llava import base_model_path, load_processor, num_image_tokens
from medlava.models.templates import IGNORE_INDEX
from medlava.tools.check_model import builtin_sample, check_model, estimate_memory, main
from transformers import LlavaForConditionalGeneration

GiB = 1024**3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    old = os.environ.get("MEDLAVA_CACHE")
    os.environ["MEDLAVA_CACHE"] = str(tmp / "cache")
    overrides = [f"output_root={tmp / 'runs'}", f"data.root={tmp / 'ham'}"]
    cfg = load_config(TINY, overrides)
    lines: list[str] = []
    report = check_model(cfg, "sft", out=lines.append)
    yield cfg, report, lines, overrides
    if old is None:
        os.environ.pop("MEDLAVA_CACHE")
    else:
        os.environ["MEDLAVA_CACHE"] = old


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _expand(ranges: str) -> list[int]:
    out = []
    for part in ranges.split(", "):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def test_parameter_counts_equal_a_manual_count(tiny):
    cfg, report, lines, _ = tiny
    raw = LlavaForConditionalGeneration.from_pretrained(base_model_path(cfg.model))
    vision, projector = _n(raw.model.vision_tower), _n(raw.model.multi_modal_projector)
    llm = _n(raw.model.language_model) + _n(raw.lm_head)
    assert vision + projector + llm == _n(raw)
    tc, r = raw.config.text_config, cfg.sft.lora.r
    h, q, kv, inter = (
        tc.hidden_size,
        tc.num_attention_heads * tc.head_dim,
        tc.num_key_value_heads * tc.head_dim,
        tc.intermediate_size,
    )
    # LoRA adds r*(in+out) per adapted Linear: q, k, v, o, gate, up, down in every decoder layer.
    lora = tc.num_hidden_layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h))
    assert report.counts == {
        "vision tower": {"trainable": 0, "frozen": vision},
        "projector": {"trainable": projector, "frozen": projector},  # peft keeps the original beside its copy
        "LLM": {"trainable": 0, "frozen": llm},
        "LoRA": {"trainable": lora, "frozen": 0},
    }
    printed = {
        row.split()[0]: row.split()[-2:]
        for row in lines
        if row.startswith(" ") and row.split()[-1].replace(",", "").isdigit()
    }
    assert printed["LoRA"] == [f"{lora:,}", "0"] and printed["total"] == [
        f"{lora + projector:,}",
        f"{vision + projector + llm:,}",
    ]


def test_printed_loss_mask_and_image_span_are_the_collators(tiny, tmp_path):
    cfg, report, lines, _ = tiny
    text = "\n".join(lines)
    m = re.search(r"(\d+) tokens; image tokens at ([\d, -]+) \((\d+)\); loss on ([\d, -]+) \((\d+)\)", text)
    assert m, text
    base = base_model_path(cfg.model)
    processor = load_processor(base, cfg.model)
    model = LlavaForConditionalGeneration.from_pretrained(base)
    sample, root = builtin_sample(tmp_path)
    enc = Encoder(processor, cfg.model.template, num_image_tokens(model), cfg.model.model_max_length, root)
    batch = collate([enc.train_item(sample)], processor.tokenizer.pad_token_id, "right")
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert int(m.group(1)) == len(ids) and report.input_ids == ids and report.labels == labels
    assert _expand(m.group(2)) == [i for i, t in enumerate(ids) if t == enc.image_token_id]
    assert int(m.group(3)) == num_image_tokens(model) == 16
    loss_positions = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert _expand(m.group(4)) == loss_positions and int(m.group(5)) == len(loss_positions)
    assert (
        processor.tokenizer.decode([ids[i] for i in loss_positions]) == " A test pattern. </s>"
    )  # LLaVA-Med conv_mistral_instruct
    rendered = "<s>[INST] <image×16>\\nWhat is shown in this image? [/INST]⟦ A test pattern. </s>⟧"
    assert rendered in [row.strip() for row in lines]


def test_generation_is_the_models_greedy_answer(tiny, tmp_path):
    # Fresh LoRA adapters are zero (B = 0), so sft's model generates exactly as the base model.
    cfg, report, lines, _ = tiny
    base = base_model_path(cfg.model)
    processor = load_processor(base, cfg.model)
    model = LlavaForConditionalGeneration.from_pretrained(base).eval()
    sample, root = builtin_sample(tmp_path)
    enc = Encoder(processor, cfg.model.template, num_image_tokens(model), cfg.model.model_max_length, root)
    prompt = enc.prompt_item(sample)
    tok = processor.tokenizer
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt["input_ids"]]),
            pixel_values=prompt["pixel_values"][None],
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    want = tok.decode(out[0, len(prompt["input_ids"]) :], skip_special_tokens=True).strip()
    assert report.generated == want and any(repr(want) in row for row in lines if row.startswith("generate"))
    after = lines[next(i for i, row in enumerate(lines) if row.startswith("generate")) + 1]
    assert "the tiny preset's weights are random" in after  # noise is what it should print, and it says so
    assert report.loss > 0 and f"{report.loss:.4f} on 14 tokens" in "\n".join(lines)


def test_align_stage_trains_the_projector_only(tiny, capsys):
    cfg, _, _, overrides = tiny
    assert main(["--config", str(TINY), "--stage", "align", *overrides]) == 0
    out = capsys.readouterr().out
    assert "template plain" in out and "<s><image×16>⟦A test pattern.\\n⟧" in out
    rows = {
        row.split()[0]: row.split()[-2:]
        for row in out.splitlines()
        if row.startswith(" ") and row.split()[0] in ("LoRA", "projector", "total")
    }
    assert rows["LoRA"] == ["0", "0"] and rows["projector"][1] == "0" and rows["total"][0] == rows["projector"][0]
    assert out.splitlines()[-1].startswith("OK")


def test_memory_formula():
    kw = dict(hidden=8, layers=2, vocab=10, batch=2, seq=3)
    acts = 2 * 34 * 3 * 2 * 8 * 2 / 2 + 2 * 3 * 2 * 10 * 4  # per layer 34·s·b·h (bf16) + fp32 logits and grad
    ddp = estimate_memory(1000, 5000, torch.bfloat16, "none", 4, checkpointing=False, **kw)
    assert (ddp.weights, ddp.grads, ddp.optimizer, ddp.activations) == (5000 * 2 + 1000 * 4, 4000, 8000, acts)
    z2 = estimate_memory(1000, 5000, torch.bfloat16, "zero2", 4, checkpointing=False, **kw)
    assert (z2.weights, z2.grads, z2.optimizer) == (6000 * 2, 1000 * 2 / 4, 1000 * 12 / 4)
    z3 = estimate_memory(1000, 5000, torch.bfloat16, "zero3", 4, checkpointing=True, **kw)
    assert (z3.weights, z3.grads, z3.optimizer) == (6000 * 2 / 4, 500, 3000)
    assert z3.activations == 2 * 3 * 2 * 8 * 2 + 34 * 3 * 2 * 8 + 2 * 3 * 2 * 10 * 4
    off = estimate_memory(1000, 5000, torch.bfloat16, "zero3_offload", 4, checkpointing=True, **kw)
    assert (off.weights, off.optimizer, off.cpu, off.grads) == (0, 0, 3000 + 3000, 500)
    # Published anchor: LLaVA-1.5-7B full fine-tune, ZeRO-3 on 8 GPUs, batch 16, checkpointing,
    # used < 35 GB per GPU; the estimate (worst case: every sequence 2048 tokens) lands in that range.
    llm, clip, proj = 6_738_415_616, 303_507_456, 21_024_768
    full = estimate_memory(
        llm + proj,
        clip,
        torch.bfloat16,
        "zero3",
        8,
        hidden=4096,
        layers=32,
        vocab=32000,
        batch=16,
        seq=2048,
        checkpointing=True,
    )
    assert 25 * GiB < full.total < 40 * GiB


def test_failures_exit_non_zero_with_the_reason(tiny, capsys, tmp_path):
    _, _, _, overrides = tiny
    assert main(["--config", str(TINY), *overrides, "model.model_max_length=16"]) == 1
    err = capsys.readouterr().err
    assert "FAIL       sample: InputError: sample check-model:" in err and "would cut the image tokens" in err
    assert main(["--model", str(tmp_path / "missing")]) == 1
    assert "FAIL       load:" in capsys.readouterr().err
    assert main(["--config", str(TINY), "sft.lora.rank=8"]) == 2
    assert "sft.lora.rank: unknown key. Allowed here: alpha, dropout, r, target_modules" in capsys.readouterr().err


def test_sample_comes_from_the_prepared_data_when_there_is_one(tiny, tmp_path):
    from medlava.stages.prepare import run as run_prepare

    cfg, _, _, overrides = tiny
    cfg = load_config(
        TINY,
        [
            *overrides,
            f"output_root={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'ham'}",
            "data.synthetic.n_lesions=14",
            "run_id=p1",
        ],
    )
    run_prepare(cfg)
    lines: list[str] = []
    report = check_model(cfg, "sft", out=lines.append)
    prepared = tmp_path / "runs" / "tiny" / "prepare" / "p1"
    first = json.loads((prepared / "train.jsonl").read_text().splitlines()[0])
    assert f"sample     {first['id']}: first train sample of {prepared}" in lines
    processor = load_processor(base_model_path(cfg.model), cfg.model)
    answer = processor.tokenizer.decode([report.input_ids[i] for i in report.loss_positions])
    assert answer == " " + first["conversations"][1]["value"] + " </s>"
    assert len(report.image_positions) == 16
