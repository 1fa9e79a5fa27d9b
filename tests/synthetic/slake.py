"""A small SLAKE in the release's layout (train.json, validate.json, test.json, imgs/xmlabN/{source.jpg,
mask.png, detection.json, question.json}, mask.txt, KG/en_*.csv), and the same records as a Hugging Face
DatasetDict on disk (BoKelvin/SLAKE's fields and split names), for tests and demos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ORGANS = ("Liver", "Lung", "Heart", "Spleen")
MODALITIES = ("CT", "MRI", "X-Ray")
KG = {
    "en_disease.csv": ["disease#attribute#value", "Pneumonia#cause#bacterial infection",
                       "Pneumonia#location#Lung"],
    "en_organ.csv": ["organ#attribute#value", "Liver#function#Detoxification, storing glycogen",
                     "Lung#function#Breathing", "Heart#function#Pumping blood", "Spleen#function#Filtering blood"],
    "en_organ_rel.csv": ["organ#relation#value", "Liver#belong to#Digestive system",
                         "Lung#belong to#Respiratory system"],
}


def _questions(img_id: int, organ: str, other: str, modality: str, rng: np.random.Generator) -> list[dict]:
    base = {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "location": "Abdomen", "modality": modality}
    yes = bool(rng.integers(2))
    return [
        {**base, "question": "What modality is used to take this image?", "answer": modality, "q_lang": "en",
         "answer_type": "OPEN", "base_type": "vqa", "content_type": "Modality", "triple": ["vhead", "_", "_"]},
        {**base, "question": f"Does the picture contain {organ.lower() if yes else other.lower()}?",
         "answer": "Yes" if yes else "No", "q_lang": "en", "answer_type": "CLOSED", "base_type": "vqa",
         "content_type": "Organ", "triple": ["vhead", "_", "_"]},
        {**base, "question": f"Which organ is shown, {organ.lower()} or {other.lower()}?", "answer": organ,
         "q_lang": "en", "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Organ",
         "triple": ["vhead", "_", "_"]},
        {**base, "question": "Where is the abnormality?", "answer": "Left", "q_lang": "en", "answer_type": "CLOSED",
         "base_type": "vqa", "content_type": "Position", "triple": ["vhead", "_", "_"]},
        {**base, "question": f"What is the function of the {organ.lower()} in this image?",
         "answer": dict(r.split("#")[::2] for r in KG["en_organ.csv"][1:])[organ], "q_lang": "en",
         "answer_type": "OPEN", "base_type": "kvqa", "content_type": "KG", "triple": ["vhead", "function", "_"]},
        {**base, "question": "这张图片的成像方式是什么?", "answer": modality, "q_lang": "zh",
         "answer_type": "OPEN",
         "base_type": "vqa", "content_type": "Modality", "triple": ["vhead", "_", "_"]},
    ]


def slake_records(n_images: int = 12, seed: int = 0, size: tuple[int, int] = (96, 80)) -> dict[str, list[dict]]:
    """Records per split (train/validate/test, by image 6:3:3 of each 12), without writing anything."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "validate": [], "test": []}
    qid = 0
    for i in range(n_images):
        organ, other = rng.choice(ORGANS, 2, replace=False)
        split = ("train", "validate", "test")[0 if i % 4 < 2 else i % 4 - 1]
        for q in _questions(i, str(organ), str(other), MODALITIES[i % 3], rng):
            splits[split].append({**q, "qid": qid})
            qid += 1
    return splits


def _draw(root: Path, img_id: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    d = root / "imgs" / f"xmlab{img_id}"
    d.mkdir(parents=True)
    w, h = size
    base = rng.normal(60, 10, (h, w, 3)).clip(0, 255).astype(np.uint8)
    image, mask = Image.fromarray(base), Image.new("L", size, 0)
    box = (w // 4, h // 4, w // 4 + w // 3, h // 4 + h // 3)  # the labelled organ
    ImageDraw.Draw(image).ellipse(box, fill=(200, 180, 170))
    ImageDraw.Draw(mask).ellipse(box, fill=1 + img_id % 4)
    image.save(d / "source.jpg", quality=92)
    mask.save(d / "mask.png")
    (d / "detection.json").write_text(json.dumps([{ORGANS[img_id % 4]: [box[0], box[1], box[2] - box[0],
                                                                        box[3] - box[1]]}]))


def make_synthetic_slake(root: Path, n_images: int = 12, seed: int = 0, size: tuple[int, int] = (96, 80),
                         val_name: str = "validate.json") -> Path:
    """Write the local release layout at `root` (deterministic for `seed`)."""
    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    records = slake_records(n_images, seed, size)
    for i in range(n_images):
        _draw(root, i, size, rng)
    for split, rows in records.items():
        name = val_name if split == "validate" else f"{split}.json"
        (root / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        for img in {r["img_id"] for r in rows}:
            (root / "imgs" / f"xmlab{img}" / "question.json").write_text(
                json.dumps([r for r in rows if r["img_id"] == img], ensure_ascii=False), encoding="utf-8")
    (root / "KG").mkdir()
    for name, lines in KG.items():
        (root / "KG" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "mask.txt").write_text("".join(f"{i + 1}:{o}\n" for i, o in enumerate(ORGANS)), encoding="utf-8")
    return root


def make_synthetic_slake_hf(root: Path, n_images: int = 12, seed: int = 0) -> Path:
    """The same records as a `datasets.DatasetDict` (train/validation/test) saved at `root`, images in
    root/imgs as the hub repo's imgs.zip unpacks."""
    import datasets

    root = Path(root)
    records = slake_records(n_images, seed)
    dd = datasets.DatasetDict({("validation" if s == "validate" else s): datasets.Dataset.from_list(rows)
                               for s, rows in records.items()})
    dd.save_to_disk(str(root))
    rng = np.random.default_rng(seed + 1)
    for i in range(n_images):
        _draw(root, i, (96, 80), rng)
    return root
