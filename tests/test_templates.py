"""Token layout and loss mask of every template, pinned on the tiny tokenizer (test_templates_reference.py holds
them to the original LLaVA / LLaVA-Med code)."""

import pytest
from medlava.io import InputError
from medlava.models.templates import IGNORE_INDEX, VICUNA_SYSTEM, encode, render
from medlava.models.tiny import build_tokenizer

N_IMG = 16
CONV = [{"from": "human", "value": "<image>\nWhat is the lesion type?"}, {"from": "gpt", "value": "nv"}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(512)


def _enc(tok, template, conv=CONV, gen=False, max_length=512):
    image_id = tok.convert_tokens_to_ids("<image>")
    return encode(render(template, conv, "s1", add_generation_prompt=gen), tok, image_id, N_IMG, max_length, "s1")


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_mistral_instruct_layout_and_loss_mask(tok):
    enc = _enc(tok, "mistral_instruct")
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    full = _text(tok, enc.input_ids).replace("<image>" * N_IMG, "<IMG>")
    assert full == "<s>[INST] <IMG>\nWhat is the lesion type? [/INST] nv </s>"  # LLaVA-Med's " a </s>"
    # Only the answer and its </s> carry loss (the model must learn to stop).
    labelled = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert _text(tok, labelled) == " nv </s>"
    assert all(label == t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX)
    # Image tokens: exactly N_IMG, contiguous, where the placeholder stood, never labelled.
    pos = [i for i, t in enumerate(enc.input_ids) if t == image_id]
    assert len(pos) == N_IMG and pos == list(range(pos[0], pos[0] + N_IMG))
    assert all(enc.labels[i] == IGNORE_INDEX for i in pos)
    assert enc.n_images == 1


def test_mistral_multi_turn_masks_every_prompt(tok):
    conv = CONV + [{"from": "human", "value": "Is it benign?"}, {"from": "gpt", "value": "yes"}]
    enc = _enc(tok, "mistral_instruct", conv)
    # One string, encoded whole: no space is put after </s> between turns.
    assert _text(tok, enc.input_ids).endswith("[/INST] nv </s>[INST] Is it benign? [/INST] yes </s>")
    labelled = [t if label != IGNORE_INDEX else None for t, label in zip(enc.input_ids, enc.labels)]
    spans, cur = [], []
    for t in labelled:
        if t is None and cur:
            spans.append(_text(tok, cur))
            cur = []
        elif t is not None:
            cur.append(t)
    spans.append(_text(tok, cur))
    assert spans == [" nv </s>", " yes </s>"]


def test_vicuna_v1_layout(tok):
    enc = _enc(tok, "vicuna_v1")
    assert (
        _text(tok, enc.input_ids).replace("<image>" * N_IMG, "<IMG>")
        == f"<s>{VICUNA_SYSTEM} USER: <IMG>\nWhat is the lesion type? ASSISTANT: nv</s>"
    )
    assert _text(tok, [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]) == " nv</s>"


def test_plain_alignment_drops_question_keeps_caption_loss(tok):
    enc = _enc(tok, "plain")
    assert _text(tok, enc.input_ids).replace("<image>" * N_IMG, "<IMG>") == "<s><IMG>nv\n"
    assert _text(tok, [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]) == "nv\n"


def test_generation_prompt_ends_where_the_answer_starts(tok):
    enc = _enc(tok, "mistral_instruct", gen=True)
    assert _text(tok, enc.input_ids).endswith("What is the lesion type? [/INST]")
    train = _enc(tok, "mistral_instruct")
    assert train.input_ids[: len(enc.input_ids)] == enc.input_ids  # no train/inference skew


def test_image_placeholder_is_moved_first_as_the_original_does(tok):
    # LLaVA's preprocess_multimodal: taken out of the text (outer spaces trimmed) and put first with a newline.
    for value in ("Look: <image> what is it?", "Look:  what is it?\n<image>"):
        conv = [{"from": "human", "value": value}, {"from": "gpt", "value": "mel"}]
        enc = _enc(tok, "mistral_instruct", conv)
        assert (
            _text(tok, enc.input_ids).replace("<image>" * N_IMG, "<IMG>")
            == "<s>[INST] <IMG>\nLook:  what is it? [/INST] mel </s>"
        )


def test_truncation_that_would_cut_the_image_fails_loudly(tok):
    with pytest.raises(InputError, match="would cut the image tokens"):
        _enc(tok, "mistral_instruct", max_length=10)


def test_truncation_that_leaves_no_answer_fails_loudly(tok):
    prompt_len = len(_enc(tok, "mistral_instruct", gen=True).input_ids)
    with pytest.raises(InputError, match="no answer tokens left"):
        _enc(tok, "mistral_instruct", max_length=prompt_len)


def test_bad_conversations_are_refused(tok):
    with pytest.raises(InputError, match="alternate human/gpt"):
        _enc(tok, "mistral_instruct", [{"from": "gpt", "value": "x"}])
    with pytest.raises(InputError, match="no answer to train on"):
        _enc(tok, "mistral_instruct", CONV[:1])
    with pytest.raises(InputError, match="one image per sample"):
        _enc(
            tok,
            "mistral_instruct",
            [
                {"from": "human", "value": "<image>a"},
                {"from": "gpt", "value": "x"},
                {"from": "human", "value": "<image>b"},
                {"from": "gpt", "value": "y"},
            ],
        )
    with pytest.raises(InputError, match="one image-caption pair"):
        _enc(tok, "plain", [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}])
