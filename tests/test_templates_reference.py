"""medlava's prompts, loss masks and option tokens against the original LLaVA / LLaVA-Med code, token by token,
on the tiny tokenizer and Mistral-7B's real one: tests/reference/templates.json holds the original functions'
outputs on tests/reference_cases.py (written by tests/reference/regenerate.py from the pinned commits)."""

import json
from types import SimpleNamespace

import pytest
from medlava.models.inputs import Encoder
from medlava.models.templates import IGNORE_INDEX, encode, render
from reference_cases import (
    CASES,
    CHOICES,
    N_IMAGE,
    REFERENCE,
    TEMPLATES,
    TOKENIZERS,
    applies,
    tokenizer,
)

REF = json.loads((REFERENCE / "templates.json").read_text())
CONVS = {name: (has_image, conv) for name, has_image, conv in CASES}


def _row(tok_name, template, case):
    return next(r for r in REF["cases"] if (r["tokenizer"], r["template"], r["case"]) == (tok_name, template, case))


def _expand(tok, ids, labels=None):
    """The original's single IMAGE_TOKEN_INDEX as medlava's N_IMAGE image tokens (LLaVA's model expands it into
    the image features, labelled IGNORE_INDEX)."""
    image = tok.convert_tokens_to_ids("<image>")
    labels = labels if labels is not None else ids
    out_ids, out_labels = [], []
    for t, y in zip(ids, labels, strict=True):
        if t == REF["image_token_index"]:
            out_ids += [image] * N_IMAGE
            out_labels += [IGNORE_INDEX] * N_IMAGE
        else:
            out_ids.append(t)
            out_labels.append(y)
    return out_ids, out_labels


def _encode(tok, template, conv, gen=False):
    segs = render(template, conv, "s", add_generation_prompt=gen)
    return "".join(s.text for s in segs), encode(segs, tok, tok.convert_tokens_to_ids("<image>"), N_IMAGE, 4096, "s")


def _encoder(tok, template):
    processor = SimpleNamespace(tokenizer=tok, image_token="<image>", image_processor=None)
    return Encoder(processor, template, N_IMAGE, 4096, ".")


CASE_IDS = [
    (t, tpl, name)
    for t in TOKENIZERS
    for tpl in TEMPLATES
    for name, has_image, conv in CASES
    if applies(tpl, has_image, conv)
]


def test_every_case_has_its_reference():
    assert {(r["tokenizer"], r["template"], r["case"]) for r in REF["cases"] if r["case"] != "choices"} == set(CASE_IDS)
    for r in REF["cases"]:  # the original labelled every case (no silent "tokenization mismatch")
        if r["case"] != "choices":
            assert any(y != IGNORE_INDEX for y in r["train"]["labels"]), r["case"]


@pytest.mark.parametrize(("tok_name", "template", "case"), CASE_IDS)
def test_training_string_ids_and_loss_mask_equal_the_original(tok_name, template, case):
    tok, ref = tokenizer(tok_name), _row(tok_name, template, case)["train"]
    text, enc = _encode(tok, template, CONVS[case][1])
    assert text == ref["text"]
    want_ids, want_labels = _expand(tok, ref["input_ids"], ref["labels"])
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels


@pytest.mark.parametrize(("tok_name", "template", "case"), CASE_IDS)
def test_generation_prompt_equals_the_original(tok_name, template, case):
    """Single-turn image questions: LLaVA-Med model_vqa.py's prompt. Otherwise (and for plain, whose
    model_vqa prompt would not be its training format): the original training ids before the last answer."""
    tok, row = tokenizer(tok_name), _row(tok_name, template, case)
    has_image, conv = CONVS[case]
    text, enc = _encode(tok, template, conv, gen=True)
    if "vqa_prompt" in row and len(conv) == 2:
        assert text == row["vqa_prompt"]["text"]
        assert enc.input_ids == _expand(tok, row["vqa_prompt"]["input_ids"])[0]
    ids, labels = _expand(tok, row["train"]["input_ids"], row["train"]["labels"])
    last_answer = max(i for i, y in enumerate(labels) if y == IGNORE_INDEX) + 1  # labels end with the answer
    assert enc.input_ids == ids[:last_answer]
    assert enc.labels == labels[:last_answer]  # earlier answers keep their labels; the prompt's end has none


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_option_tokens_equal_what_the_original_puts_after_the_prompt(tok_name, template):
    tok = tokenizer(tok_name)
    encoder = _encoder(tok, template)
    rows = [r for r in REF["cases"] if (r["tokenizer"], r["template"], r["case"]) == (tok_name, template, "choices")]
    assert [r["choices"] for r in rows] == CHOICES
    for r in rows:
        sample = {"id": "q", "image": "x.png", "conversations": [{"from": "human", "value": r["question"]}]}
        assert [encoder.answer_ids(sample, c) for c in r["choices"]] == r["answer_ids"]


def test_mistral_answer_ends_with_a_space_before_eos():
    """LLaVA-Med's conv_mistral_instruct: " nv </s>", on the real tokenizer ▁nv ▁ </s>."""
    tok = tokenizer("mistral")
    ids = _encoder(tok, "mistral_instruct").answer_ids(
        {"id": "q", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}, "nv"
    )
    assert tok.convert_ids_to_tokens(ids) == ["▁nv", "▁", "</s>"]
