"""MMMU's Health and Medicine subjects (Yue et al. 2024; MMMU/MMMU) -> multiple-choice and open samples.

The release: one folder per subject (Basic_Medical_Science, Clinical_Medicine, ...) holding
`{dev,validation,test}-00000-of-00001.parquet` with {id, question, options (a Python list literal), explanation,
image_1 .. image_7 ({bytes, path} or null), img_type, answer, topic_difficulty, question_type (multiple-choice |
open), subfield}. Questions and options name their images `<image k>`; the text is kept as MMMU keeps it. dev is the
train split (5 per subject, for few-shot prompts), validation the val split (the one papers report: test answers
are not released, so test questions, whose answer is "?", are counted and left out).

Prompts are MMMU's own LLaVA configuration (mmmu/configs/llava1.5.yaml + construct_prompt): "{question}\\n\\n(A)
opt\\n(B) opt\\n\\n\\nAnswer with the option's letter from the given choices directly." and, for open questions,
"{question}\\n\\nAnswer the question using a single word or phrase.". Images: image_1, as MMMU's run_llava.py feeds a
LLaVA, or (data.mmmu_med.images=all) every image of the question side by side.
"""

from __future__ import annotations

import ast
import io
import logging
from collections import Counter
from pathlib import Path

from PIL import Image

from medlava.config import Config
from medlava.data.benchmark import (
    IMAGE,
    MC_INSTRUCTION,
    ImageStore,
    mc_sample,
    option_letters,
    parquet_files,
    parquet_records,
)
from medlava.data.images import BadImage
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems
from medlava.io import InputError

log = logging.getLogger(__name__)

SPLITS = {"train": "dev", "val": "validation", "test": "test"}
COLUMNS = ("id", "question", "options", "answer", "question_type", *(f"image_{k}" for k in range(1, 8)))
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
META = ("subfield", "img_type", "topic_difficulty")


def mc_text(question: str, options: list[str]) -> str:
    example = "".join(f"({k}) {o}\n" for k, o in zip(option_letters(len(options)), options))
    return f"{question}\n\n{example}\n\n{MC_INSTRUCTION}"


def _image(store: ImageStore, rec: dict, where: str, every: bool) -> str | None:
    cells = [rec.get(f"image_{k}") for k in range(1, 8)]
    cells = [c for c in cells if c and c.get("bytes")]
    if not cells:
        return None
    if not every or len(cells) == 1:
        return store.embedded(cells[0], where)
    try:
        images = [Image.open(io.BytesIO(c["bytes"])) for c in cells]
        return store.combined(images, str(rec["id"]))
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage("unreadable_image", f"{where}: an image of question {rec['id']} cannot be read ({e})") from None


def _sample(store: ImageStore, rec: dict, where: str, split: str, subject: str, every: bool) -> dict:
    image = _image(store, rec, where, every)
    meta = {
        "dataset": "mmmu_med",
        "split": split,
        "subject": subject,
        "question_type": rec["question_type"],
        **{k: rec.get(k) for k in META},
    }
    question, answer = str(rec["question"]), str(rec["answer"]).strip()
    if rec["question_type"] == "multiple-choice":
        options = [str(o) for o in ast.literal_eval(rec["options"])]
        letters = option_letters(len(options))
        return mc_sample(str(rec["id"]), image, mc_text(question, options), dict(zip(letters, options)), answer, meta)
    prompt = f"{question}\n\n{OPEN_INSTRUCTION}"
    return {
        "id": str(rec["id"]),
        "image": image,
        "conversations": [
            {"from": "human", "value": (f"{IMAGE}\n" if image else "") + prompt},
            {"from": "gpt", "value": answer},
        ],
        "meta": {**meta, "task": "open", "answer": answer},
    }


def _problem(rec: dict) -> tuple[str, str] | None:
    """(reason, message) when the record cannot become a sample."""
    if rec.get("question_type") not in ("multiple-choice", "open"):
        return "unknown_label", f"question_type {rec.get('question_type')!r}: expected multiple-choice or open"
    if not str(rec.get("id") or "").strip() or not str(rec.get("question") or "").strip():
        return "bad_record", "no id or question"
    if rec["question_type"] == "multiple-choice":
        try:
            options = ast.literal_eval(str(rec.get("options")))
        except (ValueError, SyntaxError):
            return "bad_record", f"options {rec.get('options')!r} is not a list literal"
        if not isinstance(options, list) or not 2 <= len(options) <= 26:
            return "bad_record", "a multiple-choice question needs a list of 2 to 26 options"
        if str(rec.get("answer")).strip() not in option_letters(len(options)):
            return "unknown_label", f"answer {rec.get('answer')!r} is not an option letter"
    return None


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    root, o = Path(cfg.data.root), cfg.data.mmmu_med
    store = ImageStore(out_dir)
    loaded = Loaded("mmmu_med", store.root)
    stats: Counter[str] = Counter()
    for subject in o.subjects:
        for split, prefix in SPLITS.items():
            files = parquet_files(root / subject, prefix)
            if not files:
                problems.fatal(
                    InputError(
                        f"{root / subject}: no {prefix}-*.parquet (data.root holds MMMU's subject "
                        "folders, e.g. a local copy of MMMU/MMMU)"
                    )
                )
            for path in files:
                for where, rec in parquet_records(path, problems, COLUMNS):
                    if str(rec.get("answer")).strip() in ("?", "", "None"):
                        stats[f"{split}_answer_not_released"] += 1
                        continue
                    if problem := _problem(rec):
                        reason, message = problem
                        problems.add(reason, where, message)
                        continue
                    try:
                        sample = _sample(store, rec, where, split, subject, o.images == "all")
                    except BadImage as e:
                        problems.add(e.reason, where, str(e))
                        continue
                    loaded.add(sample, where)
                    stats[f"{split}_{sample['meta']['task']}"] += 1
    loaded.summary = {
        "subjects": o.subjects,
        "images": o.images,
        "split": {"official": True, **SPLITS},
        "stats": dict(sorted(stats.items())),
    }
    log.info("mmmu_med: %d questions %s", len(loaded.samples), dict(stats))
    return loaded
