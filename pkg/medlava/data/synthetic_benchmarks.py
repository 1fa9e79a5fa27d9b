"""Tiny copies of the medical VQA benchmarks in their released on-disk formats, for the tiny suite
(jobs/configs/tiny_suite.yaml, `suite.synthetic`) and tests: SLAKE (its local release, and a Hugging Face
DatasetDict), VQA-RAD (the OSF JSON + image folder, and the Hugging Face parquet copy), PathVQA (parquet), PMC-VQA
(version-1 and version-2 CSVs + figure folder), OmniMedVQA (QA_information/ JSON files + Images/), MedXpertQA MM
(MM/*.jsonl + images/) and MMMU's medical subjects (per-subject parquet files, images inside, `<image k>`
placeholders, multi-image questions).

Image colour follows the answer, so a tiny model can learn something. Each writer returns what a test needs to know
about what it wrote."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medlava.io import InputError

COLOURS = {
    "yes": (200, 60, 60),
    "no": (60, 60, 200),
    "A": (200, 200, 60),
    "B": (60, 200, 60),
    "C": (60, 200, 200),
    "D": (200, 60, 200),
    "E": (120, 120, 120),
}


def image_bytes(key: str, seed: int, size: tuple[int, int] = (40, 32), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS.get(key, (128, 128, 128)), dtype=float)
    a = (base + rng.normal(0, 12, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _parquet(path: Path, rows: list[dict], image_columns: tuple[str, ...]) -> None:
    """Rows as the hub stores them: written by `datasets`, image columns as Image features ({bytes, path})."""
    import datasets

    datasets.disable_progress_bars()
    features = {k: datasets.Image() for k in image_columns}
    ds = datasets.Dataset.from_list(rows)
    for k, f in features.items():
        ds = ds.cast_column(k, f)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


# --- SLAKE ------------------------------------------------------------------------------------------------------

ORGANS = ("Liver", "Lung", "Heart", "Spleen")
MODALITIES = ("CT", "MRI", "X-Ray")
KG = {
    "en_disease.csv": ["disease#attribute#value", "Pneumonia#cause#bacterial infection", "Pneumonia#location#Lung"],
    "en_organ.csv": [
        "organ#attribute#value",
        "Liver#function#Detoxification, storing glycogen",
        "Lung#function#Breathing",
        "Heart#function#Pumping blood",
        "Spleen#function#Filtering blood",
    ],
    "en_organ_rel.csv": [
        "organ#relation#value",
        "Liver#belong to#Digestive system",
        "Lung#belong to#Respiratory system",
    ],
}


def _questions(img_id: int, organ: str, other: str, modality: str, rng: np.random.Generator) -> list[dict]:
    base = {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "location": "Abdomen", "modality": modality}
    yes = bool(rng.integers(2))
    return [
        {
            **base,
            "question": "What modality is used to take this image?",
            "answer": modality,
            "q_lang": "en",
            "answer_type": "OPEN",
            "base_type": "vqa",
            "content_type": "Modality",
            "triple": ["vhead", "_", "_"],
        },
        {
            **base,
            "question": f"Does the picture contain {organ.lower() if yes else other.lower()}?",
            "answer": "Yes" if yes else "No",
            "q_lang": "en",
            "answer_type": "CLOSED",
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
        },
        {
            **base,
            "question": f"Which organ is shown, {organ.lower()} or {other.lower()}?",
            "answer": organ,
            "q_lang": "en",
            "answer_type": "CLOSED",
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
        },
        {
            **base,
            "question": "Where is the abnormality?",
            "answer": "Left",
            "q_lang": "en",
            "answer_type": "CLOSED",
            "base_type": "vqa",
            "content_type": "Position",
            "triple": ["vhead", "_", "_"],
        },
        {
            **base,
            "question": f"What is the function of the {organ.lower()} in this image?",
            "answer": dict(r.split("#")[::2] for r in KG["en_organ.csv"][1:])[organ],
            "q_lang": "en",
            "answer_type": "OPEN",
            "base_type": "kvqa",
            "content_type": "KG",
            "triple": ["vhead", "function", "_"],
        },
        {
            **base,
            "question": "这张图片的成像方式是什么?",
            "answer": modality,
            "q_lang": "zh",
            "answer_type": "OPEN",
            "base_type": "vqa",
            "content_type": "Modality",
            "triple": ["vhead", "_", "_"],
        },
    ]


def slake_records(n_images: int = 12, seed: int = 0) -> dict[str, list[dict]]:
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
    (d / "detection.json").write_text(
        json.dumps([{ORGANS[img_id % 4]: [box[0], box[1], box[2] - box[0], box[3] - box[1]]}])
    )


def make_synthetic_slake(
    root: Path, n_images: int = 12, seed: int = 0, size: tuple[int, int] = (96, 80), val_name: str = "validate.json"
) -> Path:
    """Write the local release layout at `root` (deterministic for `seed`)."""
    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    records = slake_records(n_images, seed)
    for i in range(n_images):
        _draw(root, i, size, rng)
    for split, rows in records.items():
        name = val_name if split == "validate" else f"{split}.json"
        (root / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        for img in {r["img_id"] for r in rows}:
            (root / "imgs" / f"xmlab{img}" / "question.json").write_text(
                json.dumps([r for r in rows if r["img_id"] == img], ensure_ascii=False), encoding="utf-8"
            )
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
    dd = datasets.DatasetDict(
        {("validation" if s == "validate" else s): datasets.Dataset.from_list(rows) for s, rows in records.items()}
    )
    dd.save_to_disk(str(root))
    rng = np.random.default_rng(seed + 1)
    for i in range(n_images):
        _draw(root, i, (96, 80), rng)
    return root


# --- VQA-RAD --------------------------------------------------------------------------------------------------

VQA_RAD_QUESTIONS = [  # (question, answer, answer_type, question_type)
    ("Is there a pleural effusion?", "Yes", "CLOSED", "PRES"),
    ("Is the heart enlarged?", "No", "CLOSED", "SIZE"),
    ("Is this a CT or an MRI?", "CT", "CLOSED", "MODALITY"),
    ("Which side is the lesion on, left or right?", "left", "CLOSED", "POS"),
    ("What organ system is shown?", "Chest", "OPEN", "ORGAN"),
    ("How many lesions are there?", 2, "OPEN", "COUNT"),
]


def make_vqa_rad_osf(root: Path, n_images: int = 4) -> dict:
    """`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`: each image gets the six questions; images 0-1 are
    training images (freeform, and a paraphrase), images 2-3 carry the test questions (test_freeform/test_para) and
    also training ones, as the release mixes them."""
    root = Path(root)
    records, qid = [], 0
    for i in range(n_images):
        name = f"synpic{5000 + i}.jpg"
        _write(root / "VQA_RAD Image Folder" / name, image_bytes("yes" if i % 2 else "no", i, fmt="JPEG"))
        for j, (q, a, kind, qtype) in enumerate(VQA_RAD_QUESTIONS):
            test = i >= 2 and j % 2 == 0
            phrase = ("test_para" if j == 4 else "test_freeform") if test else ("para" if j == 5 else "freeform")
            records.append(
                {
                    "qid": qid,
                    "phrase_type": phrase,
                    "qid_linked_id": f"03f{i}{j}",
                    "image_case_url": f"https://medpix.nlm.nih.gov/case?id={i}",
                    "image_name": name,
                    "image_organ": "CHEST",
                    "evaluation": "given",
                    "question": q,
                    "question_rephrase": "NULL",
                    "question_relation": "NULL",
                    "question_frame": "NULL",
                    "question_type": qtype,
                    "answer": a,
                    "answer_type": kind,
                }
            )
            qid += 1
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records, indent=1))
    return {"records": records}


def make_hf_vqa(root: Path, splits: dict[str, int], seed: int = 0) -> dict:
    """The flaviagiammarino layout: data/{split}-00000-of-00001-<hash>.parquet with image, question, answer; every
    other question yes/no. `splits`: file prefix -> rows."""
    out = {}
    for s, (prefix, n) in enumerate(splits.items()):
        rows = []
        for i in range(n):
            answer = ("yes", "no", "stomach", "no", "yes", "fibrosis")[i % 6]
            question = "Is this normal?" if answer in ("yes", "no") else "What is shown?"
            rows.append(
                {
                    "image": {
                        "bytes": image_bytes(answer if answer in COLOURS else "E", seed + 100 * s + i // 2, fmt="JPEG"),
                        "path": None,
                    },
                    "question": question,
                    "answer": answer,
                }
            )
        _parquet(Path(root) / "data" / f"{prefix}-00000-of-00001-{seed:016x}.parquet", rows, ("image",))
        out[prefix] = rows
    return out


# --- PMC-VQA ----------------------------------------------------------------------------------------------------


def _pmc_rows(n: int, start: int) -> list[dict]:
    rows = []
    for i in range(n):
        letter = "ABCD"[i % 4]
        options = [f"{k}:finding {k.lower()}{start + i}" for k in "ABCD"]
        rows.append(
            {
                "Figure_path": f"PMC{start + i}_F1.jpg",
                "Question": f"What does panel {i} show?",
                "Answer": options["ABCD".index(letter)][2:],
                "Choice A": options[0],
                "Choice B": " " + options[1],
                "Choice C": options[2],
                "Choice D": options[3],
                "Answer_label": letter,
            }
        )
    return rows


def make_pmc_vqa(root: Path, n_train: int = 8, n_test: int = 8, version: int = 1) -> dict:
    """Version 1: train.csv, test.csv, test_clean.csv (Figure_path, Question, Answer, Choice A..D, Answer_label),
    images/ (images.zip). Version 2: train_2.csv, test_2.csv (index, Figure_path, Caption, Question, Choice A..D,
    Answer = the letter, split), figures/ (images_2.zip)."""
    root = Path(root)
    folder = "images" if version == 1 else "figures"
    files = {"train": _pmc_rows(n_train, 100), "test": _pmc_rows(n_test, 500)}
    for rows in files.values():
        for r in rows:
            _write(
                root / folder / r["Figure_path"], image_bytes(r["Answer_label"], int(r["Figure_path"][3:6]), fmt="JPEG")
            )
    if version == 1:
        names = {"train": ["train.csv"], "test": ["test.csv", "test_clean.csv"]}
        columns = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    else:
        names = {"train": ["train_2.csv"], "test": ["test_2.csv"]}
        columns = [
            "index",
            "Figure_path",
            "Caption",
            "Question",
            "Choice A",
            "Choice B",
            "Choice C",
            "Choice D",
            "Answer",
            "split",
        ]
        for split, rows in files.items():
            for i, r in enumerate(rows):
                r.update(
                    index=str(i),
                    Caption=f"Figure {i}: a caption, with a comma\nand a line break.",
                    Answer=r["Answer_label"],
                    split=split,
                )
    for split, rows in files.items():
        for name in names[split]:
            with (root / name).open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
    return files


# --- OmniMedVQA -------------------------------------------------------------------------------------------------


def make_omnimedvqa(root: Path, per_file: int = 4) -> dict:
    """QA_information/Open-access/{ACRIMA,Chest CT Scan}.json and Restricted-access/RUS_CHN.json; images under
    Images/<dataset>/. Two- to four-option questions; `Chest CT Scan.json` writes `modality` (as the release does)."""
    root = Path(root)
    written: dict[str, list[dict]] = {}
    for access, name, modality in (
        ("Open-access", "ACRIMA", "Fundus Photography"),
        ("Open-access", "Chest CT Scan", "CT(Computed Tomography)"),
        ("Restricted-access", "RUS_CHN", "X-Ray"),
    ):
        recs = []
        for i in range(per_file):
            n_options = 2 + i % 3
            options = [f"{name} answer {k}" for k in range(n_options)]
            answer = options[i % n_options]
            image = f"Images/{name}/{i:03d}.png"
            if access == "Open-access":
                _write(root / image, image_bytes("ABCD"[i % n_options], i))
            rec = {
                "dataset": name,
                "question_id": f"{name}_{i:03d}",
                "question_type": "Disease Diagnosis",
                "question": f"What is the diagnosis of image {i}?",
                "gt_answer": answer,
                "image_path": image,
                **{f"option_{k}": o for k, o in zip("ABCD", options)},
                ("modality" if name == "Chest CT Scan" else "modality_type"): modality,
            }
            recs.append(rec)
        path = root / "QA_information" / access / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recs, indent=1))
        written[name] = recs
    return written


# --- MedXpertQA MM ----------------------------------------------------------------------------------------------


def make_medxpertqa(root: Path, n_test: int = 6) -> dict:
    """MM/dev.jsonl (2) and MM/test.jsonl: five options A-E, the question text listing them ("Answer Choices:"),
    one to three images each in images/."""
    root = Path(root)
    out = {}
    for split, n in (("dev", 2), ("test", n_test)):
        rows = []
        for i in range(n):
            label = "ABCDE"[i % 5]
            options = {k: f"choice {k.lower()} of case {i}" for k in "ABCDE"}
            names = [f"MM-{split}-{i}-{k}.jpeg" for k in range(1 + i % 3)]
            for k, name in enumerate(names):
                _write(root / "images" / name, image_bytes(label, 10 * i + k, fmt="JPEG"))
            listing = " ".join(f"({k}) {v}" for k, v in options.items())
            rows.append(
                {
                    "id": f"MM-{split}-{i}",
                    "question": f"A patient, case {i}. What is it?\nAnswer Choices: {listing}",
                    "options": options,
                    "label": label,
                    "images": names,
                    "medical_task": "Diagnosis",
                    "body_system": "Skeletal",
                    "question_type": "Reasoning",
                }
            )
        (root / "MM").mkdir(parents=True, exist_ok=True)
        (root / "MM" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[split] = rows
    return out


# --- MMMU -------------------------------------------------------------------------------------------------------


def _mmmu_row(subject: str, split: str, i: int) -> dict:
    n_options = 4 + i % 2
    answer = "ABCDE"[i % n_options]
    images = 2 if i % 3 == 1 else 1
    row = {
        "id": f"{split}_{subject}_{i + 1}",
        "question": f"<image 1> Case {i}: which finding is shown?"
        + (" Compare with <image 2>." if images == 2 else ""),
        "options": str([f"Finding {k}" for k in range(n_options)]),
        "explanation": "",
        "img_type": "['Body Scans: MRI, CT.']",
        "answer": answer if split != "test" else "?",
        "topic_difficulty": "Medium",
        "question_type": "multiple-choice",
        "subfield": "Radiology",
    }
    if i % 4 == 3 and split != "test":  # an open question
        row.update(question="<image 1> How many lesions are there?", options="[]", answer="2", question_type="open")
    for k in range(1, 8):
        row[f"image_{k}"] = (
            {
                "bytes": image_bytes(answer if k == 1 else "E", sum(map(ord, subject + split)) + 10 * i + k),
                "path": f"{row['id']}_{k}.png",
            }
            if k <= images
            else None
        )
    return row


def make_mmmu(root: Path, subjects: tuple[str, ...] = ("Clinical_Medicine", "Pharmacy"), n: dict | None = None) -> dict:
    """<Subject>/{dev,validation,test}-00000-of-00001.parquet as MMMU/MMMU has them; the test answers are "?"."""
    n = n or {"dev": 2, "validation": 6, "test": 2}
    out = {}
    for subject in subjects:
        for split, count in n.items():
            rows = [_mmmu_row(subject, split, i) for i in range(count)]
            _parquet(
                Path(root) / subject / f"{split}-00000-of-00001.parquet", rows, tuple(f"image_{k}" for k in range(1, 8))
            )
            out[(subject, split)] = rows
    return out


# --- the tiny suite ---------------------------------------------------------------------------------------------

MARKER = ".medlava-synthetic-suite.json"
RELEASES = {
    "SLAKE": make_synthetic_slake,
    "VQA_RAD": make_vqa_rad_osf,
    "path-vqa": lambda r: make_hf_vqa(r, {"train": 8, "validation": 4, "test": 6}, seed=3),
    "PMC-VQA": make_pmc_vqa,
    "OmniMedVQA": make_omnimedvqa,
    "MedXpertQA": make_medxpertqa,
    "MMMU": make_mmmu,
}
"""Folder under the suite's data.root -> its writer (the names jobs/configs/tiny_suite.yaml points at)."""


def ensure_synthetic_suite(root: Path) -> Path:
    """Every release of RELEASES under `root`, written once: built in a temp dir beside it and renamed into place;
    a complete one is reused, a foreign directory refused."""
    root = Path(root)
    if (root / MARKER).is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise InputError(
            f"{root} exists and is not a synthetic suite written by medlava (no {MARKER}); set "
            "suite.synthetic=false to read real releases there, or point data.root elsewhere"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for name, write in RELEASES.items():
            write(tmp / name)
        (tmp / MARKER).write_text(json.dumps({"releases": list(RELEASES)}) + "\n")
        try:
            os.replace(tmp, root)  # atomic; replaces an empty directory, fails on a full one
        except OSError:
            if not (root / MARKER).is_file():  # another process finished first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
