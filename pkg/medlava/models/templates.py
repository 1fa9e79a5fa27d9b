"""Chat templates of LLaVA-Med / LLaVA: the conversation string, its token ids and its loss mask.

Faithful to the original code (tests/test_templates_reference.py holds them to its outputs token by token):
- the string is what the original's `Conversation.get_prompt` makes: `mistral_instruct` is LLaVA-Med's
  conv_mistral_instruct (`[INST] q [/INST] a </s>`), `vicuna_v1` LLaVA's conv_vicuna_v1, `plain` LLaVA's
  preprocess_plain (`<image>caption\n`), with `<image>` taken out of its turn and put first (`<image>\nq`), as
  LLaVA's preprocess_multimodal and LLaVA-Med's model_vqa.py do;
- the whole conversation is tokenized at once, split only at `<image>` as LLaVA's tokenizer_image_token does;
- loss falls on each answer and its end marker: a token is labelled when it lies within an answer's span,
  found from the token count of the text before and through the span (what the original's round arithmetic
  computes, without its silent "tokenization mismatch" that zeroes a sample's labels).
Anything that would silently zero a sample's loss (no answer tokens left, image tokens cut) raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medlava.io import InputError

IGNORE_INDEX = -100
IMAGE = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("mistral_instruct", "vicuna_v1", "plain")


@dataclass(frozen=True)
class Segment:
    text: str
    loss: bool


def image_first(value: str) -> str:
    """`<image>` out of the text and in front of it (LLaVA preprocess_multimodal, LLaVA-Med model_vqa.py)."""
    if IMAGE not in value:
        return value
    return (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()


def _turns(conversations: Sequence[dict], sample_id: str) -> list[tuple[str, str | None]]:
    """[(human, gpt_or_None), ...]; a trailing human turn has no answer (a prompt for generation)."""
    turns: list[tuple[str, str | None]] = []
    for i in range(0, len(conversations), 2):
        human = conversations[i]
        gpt = conversations[i + 1] if i + 1 < len(conversations) else None
        if human.get("from") not in ("human", "user") or (gpt and gpt.get("from") not in ("gpt", "assistant")):
            raise InputError(
                f"sample {sample_id}: conversations must alternate human/gpt starting with human, "
                f"got {[c.get('from') for c in conversations]}"
            )
        turns.append((image_first(str(human["value"])), None if gpt is None else image_first(str(gpt["value"]))))
    if not turns:
        raise InputError(f"sample {sample_id}: empty conversations")
    return turns


def render(
    template: str, conversations: Sequence[dict], sample_id: str = "?", add_generation_prompt: bool = False
) -> list[Segment]:
    """The conversation string in pieces that carry loss or not. With add_generation_prompt the last gpt
    turn is dropped (if any) and the string ends where the assistant's answer would begin."""
    turns = _turns(conversations, sample_id)
    if add_generation_prompt:
        turns[-1] = (turns[-1][0], None)
    elif turns[-1][1] is None:
        raise InputError(f"sample {sample_id}: the last human turn has no answer to train on")
    segs: list[Segment] = []
    if template == "mistral_instruct":  # [INST] <image>\nq [/INST] a </s>[INST] q2 [/INST] a2 </s>
        for human, gpt in turns:
            segs.append(Segment(f"[INST] {human} [/INST]", False))
            if gpt is not None:
                segs.append(Segment(f" {gpt} </s>", True))
    elif template == "vicuna_v1":  # SYSTEM USER: <image>\nq ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>
        for i, (human, gpt) in enumerate(turns):
            segs.append(Segment(f"{VICUNA_SYSTEM + ' ' if i == 0 else ''}USER: {human} ASSISTANT:", False))
            if gpt is not None:
                segs.append(Segment(f" {gpt}</s>", True))
    elif template == "plain":  # alignment: <image>caption\n, the question dropped, loss on the caption
        human, gpt = turns[0]
        if len(turns) != 1 or IMAGE not in human:
            raise InputError(
                f"sample {sample_id}: the plain (alignment) template takes one image-caption pair "
                "with <image> in the human turn"
            )
        segs.append(Segment(IMAGE, False))
        if gpt is not None:
            segs.append(Segment(gpt + "\n", True))
    else:
        raise ValueError(f"unknown template {template!r}: {', '.join(TEMPLATES)}")
    return segs


def tokenize(text: str, tokenizer, image_token_id: int, n_image_tokens: int) -> tuple[list[int], int]:
    """(ids, number of <image>s): LLaVA's tokenizer_image_token, each placeholder expanded to its tokens."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in text.split(IMAGE)]
    # Each chunk was encoded as a whole text; the <s> that the tokenizer put in front of the later ones goes.
    skip = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [image_token_id] * n_image_tokens + chunk[skip:]
    return ids, len(chunks) - 1


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int


def encode(
    segments: Sequence[Segment],
    tokenizer,
    image_token_id: int,
    n_image_tokens: int,
    max_length: int,
    sample_id: str = "?",
) -> Encoded:
    text = "".join(s.text for s in segments)
    ids, n_images = tokenize(text, tokenizer, image_token_id, n_image_tokens)
    labels = [IGNORE_INDEX] * len(ids)
    end = 0
    for seg in segments:
        start, end = end, end + len(seg.text)
        if seg.loss:
            lo = len(tokenize(text[:start], tokenizer, image_token_id, n_image_tokens)[0])
            hi = len(tokenize(text[:end], tokenizer, image_token_id, n_image_tokens)[0])
            labels[lo:hi] = ids[lo:hi]
    if n_images > 1:
        raise InputError(f"sample {sample_id}: {n_images} <image> placeholders; one image per sample is supported")
    if len(ids) > max_length and not any(s.loss for s in segments):  # a prompt: its end is the question's end
        raise InputError(
            f"sample {sample_id}: the prompt is {len(ids)} tokens (image tokens included), over "
            f"model.model_max_length={max_length}; cut, the model would answer a question it never "
            "saw whole. Shorten the question or raise model.model_max_length"
        )
    if len(ids) > max_length:
        last_image = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
        if last_image >= max_length:
            raise InputError(
                f"sample {sample_id}: {len(ids)} tokens; truncating to model.model_max_length="
                f"{max_length} would cut the image tokens. Raise model.model_max_length or shorten it"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if any(s.loss for s in segments) and all(label == IGNORE_INDEX for label in labels):
        raise InputError(
            f"sample {sample_id}: no answer tokens left within model.model_max_length={max_length}; "
            "raise it or shorten the prompt"
        )
    return Encoded(ids, labels, n_images)
