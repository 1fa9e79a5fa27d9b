"""Chunking, resume and merge of answer files; option scoring against an independent computation; compiled
decoding against eager decoding."""

import copy
import json

import pytest
import torch
from medlava.config import TinyModelConfig
from medlava.infer.chunks import (
    ChunkWriter,
    chunk_of,
    chunk_path,
    merge_chunks,
    partial_path,
)
from medlava.infer.score import generate, score_choices
from medlava.io import InputError
from medlava.models.inputs import Encoder
from medlava.models.llava import num_image_tokens
from medlava.models.templates import encode, render
from medlava.models.tiny import build_tiny


def test_chunk_assignment_is_stable_and_covers_everything():
    ids = [f"ISIC_{i:07d}" for i in range(500)]
    a = {i: chunk_of(i, 4) for i in ids}
    assert {i: chunk_of(i, 4) for i in reversed(ids)} == a  # order does not matter
    assert {i: chunk_of(i, 4) for i in ids[:100]} == {i: a[i] for i in ids[:100]}  # nor the other samples
    sizes = [sum(1 for v in a.values() if v == k) for k in range(4)]
    assert sum(sizes) == 500 and min(sizes) > 80  # roughly balanced


def _row(i):
    return {"question_id": i, "text": "nv"}


SOURCE = {"infer.checkpoint": "/runs/tiny/sft/r1/checkpoints/step-000010", "infer.mode": "score"}


def test_resume_skips_answered_ids_and_repairs_a_torn_line(tmp_path):
    final = chunk_path(tmp_path, 0, 2)
    w = ChunkWriter(final, SOURCE)
    w.write([_row("a"), _row("b")])
    w._f.close()
    with partial_path(final).open("a") as f:
        f.write('{"question_id": "c", "te')  # killed mid-write
    w2 = ChunkWriter(final, SOURCE)
    assert w2.done_ids == {"a", "b"}
    w2.write([_row("c")])
    w2.finish()
    assert [json.loads(line)["question_id"] for line in final.read_text().splitlines()] == ["a", "b", "c"]
    assert not partial_path(final).exists()


def test_merge_covers_each_sample_exactly_once(tmp_path):
    ids = [str(i) for i in range(20)]
    for k in range(2):
        w = ChunkWriter(chunk_path(tmp_path, k, 2), SOURCE)
        w.write([_row(i) for i in ids if chunk_of(i, 2) == k])
        w.finish()
    assert [r["question_id"] for r in merge_chunks(tmp_path, 2, ids, SOURCE)] == ids
    with pytest.raises(InputError, match="1 missing"):
        merge_chunks(tmp_path, 2, ids + ["20"], SOURCE)
    with pytest.raises(InputError, match="1 unknown"):
        merge_chunks(tmp_path, 2, ids[1:], SOURCE)
    with chunk_path(tmp_path, 1, 2).open("a") as f:
        f.write(json.dumps(_row("0")) + "\n")
    with pytest.raises(InputError, match="1 answered twice"):
        merge_chunks(tmp_path, 2, ids, SOURCE)


def test_merge_refuses_unfinished_chunks(tmp_path):
    ChunkWriter(chunk_path(tmp_path, 0, 2), SOURCE).finish()
    with pytest.raises(FileNotFoundError, match="1 of 2 chunks are not finished"):
        merge_chunks(tmp_path, 2, [], SOURCE)


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(TinyModelConfig())
    return model.eval(), processor


def _prompt(processor, model, question, seed):
    tok = processor.tokenizer
    conv = [{"from": "human", "value": f"<image>\n{question}"}]
    enc = encode(
        render("mistral_instruct", conv, add_generation_prompt=True),
        tok,
        tok.convert_tokens_to_ids("<image>"),
        num_image_tokens(model),
        512,
    )
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": enc.input_ids, "pixel_values": torch.randn(3, 32, 32, generator=g)}


@torch.no_grad()
def _naive_logp(model, prompt, cont):
    ids = torch.tensor([prompt["input_ids"] + cont])
    logits = model(input_ids=ids, pixel_values=prompt["pixel_values"][None]).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    n = len(prompt["input_ids"])
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(cont))


def test_option_scoring_with_shared_prompt_matches_one_pass_per_choice(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    # Prompts of different lengths (left padding) and choice lists of different sizes and token lengths.
    prompts = [
        _prompt(processor, model, "What is the lesion type?", 0),
        _prompt(processor, model, "Is this a melanocytic nevus or a melanoma, given the border?", 1),
    ]
    encoder = Encoder(processor, "mistral_instruct", num_image_tokens(model), 512, ".")
    sample = {"id": "q", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
    choices = [
        [encoder.answer_ids(sample, c) for c in ["akiec", "bcc", "nv", "vascular lesion"]],
        [encoder.answer_ids(sample, c) for c in ["yes", "no"]],
    ]
    assert tok.decode(choices[1][0]) == " yes </s>"  # LLaVA-Med's conv_mistral_instruct answer
    got = score_choices(model, prompts, choices, tok.pad_token_id, torch.device("cpu"))
    want = [[_naive_logp(model, p, c) for c in cs] for p, cs in zip(prompts, choices)]
    assert [len(g) for g in got] == [4, 2]
    for g, w in zip(got, want):  # equal to fp32 rounding (the prompt shared by the choices in one pass)
        assert g == pytest.approx(w, rel=1e-6, abs=1e-5)
    # A choice sees the prompt and itself only: its score does not depend on the choices listed beside it.
    alone = score_choices(model, prompts, [[choices[0][3]], [choices[1][1]]], tok.pad_token_id, torch.device("cpu"))
    assert alone == [pytest.approx([got[0][3]], rel=1e-6), pytest.approx([got[1][1]], rel=1e-6)]
    # eager attention takes the same mask as additive scores
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert score_choices(eager, prompts, choices, tok.pad_token_id, torch.device("cpu")) == [
        pytest.approx(g, rel=1e-6, abs=1e-5) for g in got
    ]


def test_batched_generation_with_left_padding_matches_one_by_one(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    prompts = [
        _prompt(processor, model, "What is the lesion type?", 0),
        _prompt(processor, model, "Describe the lesion border and colour in detail please.", 1),
    ]
    batched = generate(model, prompts, tok, torch.device("cpu"), 6, 1, 0.0)
    single = [generate(model, [p], tok, torch.device("cpu"), 6, 1, 0.0)[0] for p in prompts]
    assert batched == single


def test_compiled_decoding_with_a_static_cache_answers_as_eager_decoding(tiny):
    """infer.compile=true: prompts padded to a multiple of 64 tokens, a static KV cache, the decoding step
    compiled (inductor; CUDA graphs on a GPU): the same greedy answers, in one compiled graph."""
    model, processor = tiny
    tok = processor.tokenizer
    prompts = [
        _prompt(processor, model, "What is the lesion type?", 0),
        _prompt(processor, model, "Describe the lesion border and colour in detail please.", 1),
    ]
    eager = generate(model, prompts, tok, torch.device("cpu"), 8, 1, 0.0)
    torch._dynamo.utils.counters.clear()
    compiled = generate(model, prompts, tok, torch.device("cpu"), 8, 1, 0.0, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert compiled == eager and all(compiled)
