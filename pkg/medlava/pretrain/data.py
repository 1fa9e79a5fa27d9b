"""Image-caption pairs from the prepared sample JSONL, and the zero-shot classification task a split holds.

Captions by dataset: HAM10000 from its label and body site ("a dermoscopy image of melanoma on the back"); MIMIC-CXR
the report section it was prepared with; LLaVA-Med the figure caption (alignment) or the answers (instruct);
SLAKE and CheXpert Plus each question with its answer, SLAKE's led by modality and organ. Samples that share
an image become one pair (their texts joined), so an image is never its own negative in a batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate

from medlava.data.images import load_image, resolve_image
from medlava.io import InputError
from medlava.models.inputs import item_error

log = logging.getLogger(__name__)

HAM10000_NAMES = {
    "akiec": "actinic keratosis",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
CHEXPERT_5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
"""The CheXpert competition labels; zero-shot uses the studies positive for exactly one (GLoRIA's CheXpert 5x200)."""
PROMPTS = {"ham10000": ["a dermoscopy image of {}."], "chexpert": ["a chest x-ray showing {}."]}


@dataclass(frozen=True)
class Pair:
    id: str
    image: str
    caption: str
    meta: dict = field(default_factory=dict)


def _text(value: str) -> str:
    return " ".join(value.replace("<image>", " ").split())


def caption(sample: dict) -> str:
    meta = sample.get("meta") or {}
    turns = sample["conversations"]
    if meta.get("dataset") == "ham10000":
        label = meta.get("label", meta.get("answer"))
        if label not in HAM10000_NAMES:
            raise InputError(f"sample {sample['id']}: HAM10000 label {label!r} is not one of {list(HAM10000_NAMES)}")
        where = meta.get("localization")
        return f"a dermoscopy image of {HAM10000_NAMES[label]}" + (
            f" on the {where}" if where and where != "unknown" else ""
        )
    answers = [_text(t["value"]) for t in turns if t.get("from") == "gpt"]
    if meta.get("task") == "report" or meta.get("dataset") == "llava_med":  # the answer is the text of the image
        return " ".join(answers)
    questions = [_text(t["value"]) for t in turns if t.get("from") == "human"]
    qa = " ".join(f"{q} {a}" for q, a in zip(questions, answers))
    if meta.get("dataset") == "slake" and meta.get("modality"):
        return f"a {meta['modality']} image of the {str(meta.get('location') or 'body').lower()}. {qa}"
    return qa


def pairs_of(samples: list[dict], where: Path) -> list[Pair]:
    """One pair per image, in first-seen order; samples without an image (text-only) are left out."""
    by_image: dict[str, tuple[dict, list[str]]] = {}
    for s in samples:
        if not s.get("image"):
            continue
        text = caption(s)
        if not text:
            raise InputError(f"{where}: sample {s['id']} gives an empty caption (no answer text); fix or remove it")
        texts = by_image.setdefault(s["image"], (s, []))[1]
        if text not in texts:
            texts.append(text)
    skipped = len(samples) - sum(1 for s in samples if s.get("image"))
    if skipped:
        log.info("%s: %d text-only samples left out (no image)", where, skipped)
    return [Pair(str(s["id"]), image, " ".join(texts), s.get("meta") or {}) for image, (s, texts) in by_image.items()]


@dataclass(frozen=True)
class ZeroShot:
    """A classification task on pairs: class labels, the names their prompts use, prompt templates (`{}`: the
    name), and each labelled pair's class index."""

    classes: list[str]
    names: list[str]
    templates: list[str]
    labelled: list[tuple[int, int]]  # (pair index, class index)


def zero_shot_task(pairs: list[Pair], classes: list[str] | None, templates: list[str]) -> ZeroShot | None:
    """HAM10000's 7 classes, or CheXpert's 5 competition labels on single-positive studies; None when neither."""
    if pairs and pairs[0].meta.get("dataset") == "ham10000":
        classes = classes or list(HAM10000_NAMES)
        labelled = [(i, classes.index(p.meta["label"])) for i, p in enumerate(pairs)]
        names, templates = HAM10000_NAMES, templates or PROMPTS["ham10000"]
    else:
        classes, names, labelled = list(CHEXPERT_5), {c: c.lower() for c in CHEXPERT_5}, []
        for i, p in enumerate(pairs):
            positive = [c for c in CHEXPERT_5 if (p.meta.get("chexpert") or {}).get(c) == 1]
            if len(positive) == 1:
                labelled.append((i, classes.index(positive[0])))
        templates = templates or PROMPTS["chexpert"]
        if not labelled:
            return None
    return ZeroShot(classes, [names[c] for c in classes], templates, labelled)


class PairDataset(torch.utils.data.Dataset):
    """(image, tokens) per pair; a bad image comes back as {"error": message} (raised by the main process)."""

    def __init__(self, pairs: list[Pair], root: Path, transform, tokenizer):
        self.pairs, self.root, self.transform, self.tokenizer = pairs, Path(root), transform, tokenizer

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        try:
            image = self.transform(load_image(resolve_image(self.root, p.image), p.id))
        except InputError as e:
            return {"error": str(e)}
        return {"image": image, "text": self.tokenizer([p.caption])[0]}


def collate(items: list[dict]) -> dict:
    return item_error(items) or default_collate(items)
