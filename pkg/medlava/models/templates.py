"""Chat templates of LLaVA-Med / LLaVA, rendered turn by turn into token ids and a loss mask.

Turn-by-turn encoding (not LLaVA's string splitting) means the loss mask is right by construction;
anything that would silently zero a sample's loss (no answer tokens left, image tokens cut) raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medlava.io import InputError

IGNORE_INDEX = -100
IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Segment:
    text: str | None  # None for a special token given by `token`
    loss: bool
    token: str | None = None  # "bos" | "eos"


def _turns(conversations: Sequence[dict], sample_id: str) -> list[tuple[str, str | None]]:
    """[(human, gpt_or_None), ...]; a trailing human turn has no answer (a prompt for generation)."""
    turns: list[tuple[str, str | None]] = []
    for i in range(0, len(conversations), 2):
        human = conversations[i]
        gpt = conversations[i + 1] if i + 1 < len(conversations) else None
        if human.get("from") not in ("human", "user") or (gpt and gpt.get("from") not in ("gpt", "assistant")):
            raise InputError(f"sample {sample_id}: conversations must alternate human/gpt starting with human, "
                             f"got {[c.get('from') for c in conversations]}")
        turns.append((str(human["value"]), None if gpt is None else str(gpt["value"])))
    if not turns:
        raise InputError(f"sample {sample_id}: empty conversations")
    return turns


def render(template: str, conversations: Sequence[dict], sample_id: str = "?",
           add_generation_prompt: bool = False) -> list[Segment]:
    """Segments of one sample. With add_generation_prompt the last gpt turn is dropped (if any) and the
    rendering ends where the assistant's answer would begin."""
    turns = _turns(conversations, sample_id)
    if add_generation_prompt:
        turns[-1] = (turns[-1][0], None)
    elif turns[-1][1] is None:
        raise InputError(f"sample {sample_id}: the last human turn has no answer to train on")
    segs = [Segment(None, False, "bos")]
    if template == "mistral_instruct":  # LLaVA-Med v1.5: <s>[INST] q [/INST] a</s>[INST] q2 [/INST] a2</s>
        for human, gpt in turns:
            segs.append(Segment(f"[INST] {human.strip()} [/INST]", False))
            if gpt is not None:
                segs += [Segment(" " + gpt.strip(), True), Segment(None, True, "eos")]
    elif template == "vicuna_v1":  # LLaVA-1.5: SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>
        for i, (human, gpt) in enumerate(turns):
            lead = VICUNA_SYSTEM + " " if i == 0 else ""
            segs.append(Segment(f"{lead}USER: {human.strip()} ASSISTANT:", False))
            if gpt is not None:
                segs += [Segment(" " + gpt.strip(), True), Segment(None, True, "eos")]
    elif template == "plain":  # alignment: <s><image>caption\n, loss on the caption only
        if len(turns) != 1:
            raise InputError(f"sample {sample_id}: the plain (alignment) template takes one image-caption pair")
        human, gpt = turns[0]
        segs.append(Segment(IMAGE if IMAGE in human else "", False))
        if gpt is not None:
            segs.append(Segment(gpt.strip() + "\n", True))
    else:
        raise ValueError(f"unknown template {template!r}: mistral_instruct, vicuna_v1 or plain")
    return segs


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int


def encode(segments: Sequence[Segment], tokenizer, image_token_id: int, n_image_tokens: int,
           max_length: int, sample_id: str = "?") -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    n_images = 0
    for seg in segments:
        if seg.token is not None:
            piece = [tokenizer.bos_token_id if seg.token == "bos" else tokenizer.eos_token_id]
        else:
            piece = []
            for j, text in enumerate(seg.text.split(IMAGE)):
                if j:  # an <image> placeholder stood here
                    piece += [image_token_id] * n_image_tokens
                    n_images += 1
                if text:
                    piece += tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if seg.loss else [IGNORE_INDEX] * len(piece)
    if n_images > 1:
        raise InputError(f"sample {sample_id}: {n_images} <image> placeholders; one image per sample is supported")
    if len(ids) > max_length and not any(s.loss for s in segments):  # a prompt: its end is the question's end
        raise InputError(f"sample {sample_id}: the prompt is {len(ids)} tokens (image tokens included), over "
                         f"model.model_max_length={max_length}; cut, the model would answer a question it never "
                         "saw whole. Shorten the question or raise model.model_max_length")
    if len(ids) > max_length:
        last_image = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
        if last_image >= max_length:
            raise InputError(f"sample {sample_id}: {len(ids)} tokens; truncating to model.model_max_length="
                             f"{max_length} would cut the image tokens. Raise model.model_max_length or shorten it")
        ids, labels = ids[:max_length], labels[:max_length]
    if any(s.loss for s in segments) and all(l == IGNORE_INDEX for l in labels):
        raise InputError(f"sample {sample_id}: no answer tokens left within model.model_max_length={max_length}; "
                         "raise it or shorten the prompt")
    return Encoded(ids, labels, n_images)
