"""Samples (the prepared JSONL) -> model inputs: token ids with expanded image tokens, loss labels and
pixel values; and the collators that pad them (right for training, left for generation)."""

from __future__ import annotations

from pathlib import Path

import torch

from medlava.data.images import load_image, pixel_values, resolve_image
from medlava.io import InputError
from medlava.models.templates import IGNORE_INDEX, Encoded, encode, render


class Encoder:
    def __init__(self, processor, template: str, n_image_tokens: int, max_length: int, image_root: Path):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.n_image_tokens = n_image_tokens
        self.max_length = max_length
        self.image_root = Path(image_root)

    def pixel_values(self, sample: dict) -> torch.Tensor | None:
        if not sample.get("image"):
            return None
        image = load_image(resolve_image(self.image_root, sample["image"]), sample_id=str(sample["id"]))
        return pixel_values(image, self.processor.image_processor)

    def _encode(self, sample: dict, generation: bool) -> Encoded:
        segments = render(self.template, sample["conversations"], str(sample["id"]), add_generation_prompt=generation)
        enc = encode(
            segments, self.tokenizer, self.image_token_id, self.n_image_tokens, self.max_length, str(sample["id"])
        )
        if enc.n_images != (1 if sample.get("image") else 0):
            raise ValueError(
                f"sample {sample['id']}: {enc.n_images} <image> placeholders but "
                f"{'an' if sample.get('image') else 'no'} image; put one <image> in the first human turn"
            )
        return enc

    def train_item(self, sample: dict) -> dict:
        enc = self._encode(sample, generation=False)
        return {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": self.pixel_values(sample)}

    def prompt_item(self, sample: dict) -> dict:
        enc = self._encode(sample, generation=True)
        return {"input_ids": enc.input_ids, "pixel_values": self.pixel_values(sample), "id": sample["id"]}

    def answer_ids(self, sample: dict, answer: str) -> list[int]:
        """The tokens the template puts after the prompt when `answer` is the reply (option scoring):
        " nv </s>" for mistral_instruct, " nv</s>" for vicuna_v1, "nv\n" for plain."""
        turns = list(sample["conversations"])
        if turns[-1].get("from") in ("gpt", "assistant"):
            turns = turns[:-1]
        full = self._encode({**sample, "conversations": turns + [{"from": "gpt", "value": answer}]}, generation=False)
        prompt = self._encode(sample, generation=True).input_ids
        if full.input_ids[: len(prompt)] != prompt:
            raise InputError(
                f"sample {sample['id']}: the prompt tokenizes differently when the answer {answer!r} "
                "follows it, so its likelihood cannot be scored after the prompt alone"
            )
        return full.input_ids[len(prompt) :]


def item_error(items: list[dict]) -> dict | None:
    """The first bad-input error among `items` (see SampleDataset), as a batch that carries only it."""
    return next(({"error": it["error"]} for it in items if "error" in it), None)


def raise_batch_error(batch: dict | list[dict]) -> None:
    """Re-raise, in the main process, a bad-input error a DataLoader worker met."""
    error = item_error(batch) if isinstance(batch, list) else batch if "error" in batch else None
    if error:
        raise InputError(error["error"])


def collate(items: list[dict], pad_id: int, side: str = "right", multiple: int = 1) -> dict:
    """Padded to the longest item, rounded up to `multiple` tokens."""
    if error := item_error(items):
        return error
    width = -(-max(len(it["input_ids"]) for it in items) // multiple) * multiple
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long) if "labels" in items[0] else None
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, span] = torch.tensor(it["input_ids"])
        mask[i, span] = 1
        if labels is not None:
            labels[i, span] = torch.tensor(it["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = labels
    pixels = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def collate_packed(items: list[dict]) -> dict:
    """Padding-free: the micro-batch's samples end to end in one row, positions restarting per sample.

    transformers builds a block-diagonal causal mask from the position ids (varlen for flash-attn), so
    no token attends across samples; each sample starts with an unlabelled <s>, so no loss crosses
    a boundary either. Same samples, same loss as the padded batch, no pad tokens computed."""
    if error := item_error(items):
        return error
    ids = torch.tensor([t for it in items for t in it["input_ids"]])[None]
    labels = torch.tensor([t for it in items for t in it["labels"]])[None]
    positions = torch.cat([torch.arange(len(it["input_ids"])) for it in items])[None]
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    pixels = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


class SampleDataset(torch.utils.data.Dataset):
    """Training items (or, with `prompts`, generation/scoring prompts) of `samples`, built in DataLoader workers.

    A bad image or sample comes back as {"error": message}: raised in a worker, torch would re-raise it buried
    in a traceback (and as RuntimeError when the exception takes other arguments). The collators pass it on
    and raise_batch_error raises it in the main process, so the user sees the message that names the file."""

    def __init__(self, samples: list[dict], encoder: Encoder, prompts: bool = False):
        self.samples, self.encoder = samples, encoder
        self.make = encoder.prompt_item if prompts else encoder.train_item
        self._lengths: list[int] | None = None

    def lengths(self) -> list[int]:
        """Approximate token lengths (text tokens + image tokens) for length grouping, computed once."""
        if self._lengths is None:
            texts = [" ".join(str(c["value"]) for c in s["conversations"]) for s in self.samples]
            counts = self.encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]
            self._lengths = [
                len(c) + (self.encoder.n_image_tokens if s.get("image") else 0) for c, s in zip(counts, self.samples)
            ]
        return self._lengths

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        try:
            return self.make(self.samples[i])
        except InputError as e:
            return {"error": str(e)}
