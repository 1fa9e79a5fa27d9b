"""VQA-RAD (Lau et al. 2018) -> VQA samples, from either release:

- osf: the Open Science Framework release (osf.io/89kps): `VQA_RAD Dataset Public.json`, a JSON array of
  {qid, phrase_type, qid_linked_id, image_case_url, image_name, image_organ, evaluation, question,
  question_rephrase, question_relation, question_frame, question_type, answer, answer_type}, images in
  `VQA_RAD Image Folder/`. The published split: phrase_type test_freeform / test_para is the test set (451
  questions), freeform / para the training set. answer_type OPEN/CLOSED is meta.task.
- hf: flaviagiammarino/vqa-rad (data/{train,test}-*.parquet: image {bytes, path}, question, answer; 1,793 / 451
  rows). It has no answer_type: a yes/no answer is closed (the card's "binary yes/no questions"), anything else open.

Train and test share images by design (the test questions are on training images), so no group is enforced.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from medlava.config import Config
from medlava.data.benchmark import hf_vqa, vqa_sample
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, read_json_records

log = logging.getLogger(__name__)

OSF_FILE = "VQA_RAD Dataset Public.json"
OSF_IMAGES = "VQA_RAD Image Folder"
OSF_FIELDS = ("qid", "image_name", "question", "answer", "answer_type", "phrase_type")
META = (
    "qid_linked_id",
    "image_organ",
    "question_type",
    "phrase_type",
    "evaluation",
    "question_relation",
    "question_frame",
)


def _osf(cfg: Config, problems: Problems, root: Path) -> Loaded:
    images = cfg.data.image_dir(root / OSF_IMAGES)
    loaded = Loaded("vqa_rad", images)
    stats: Counter[str] = Counter()
    for where, rec in read_json_records(root / OSF_FILE, problems):
        missing = [k for k in OSF_FIELDS if rec.get(k) is None or str(rec[k]).strip() == ""]
        if missing:
            problems.add("bad_record", where, f"no {', '.join(missing)} (VQA-RAD fields: {', '.join(OSF_FIELDS)})")
            continue
        kind, phrase = str(rec["answer_type"]).strip().upper(), str(rec["phrase_type"]).strip()
        if kind not in ("OPEN", "CLOSED") or phrase not in ("freeform", "para", "test_freeform", "test_para"):
            problems.add(
                "unknown_label",
                where,
                f"answer_type {kind!r} / phrase_type {phrase!r}: expected OPEN|CLOSED "
                "and freeform|para|test_freeform|test_para",
            )
            continue
        split = "test" if phrase.startswith("test") else "train"
        stats[f"{split}_{kind.lower()}"] += 1
        meta = {
            "dataset": "vqa_rad",
            "split": split,
            "answer_type": kind,
            "image_name": str(rec["image_name"]),
            **{k: rec.get(k) for k in META},
        }
        loaded.add(
            vqa_sample(
                str(rec["qid"]),
                str(rec["image_name"]),
                str(rec["question"]),
                str(rec["answer"]),
                kind.lower(),
                meta,
                cfg.data.vqa_rad.instruction,
            ),
            where,
        )
    loaded.summary = {"source": "osf", "split": {"official": True, "by": "phrase_type"}, "stats": dict(stats)}
    return loaded


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    root = Path(cfg.data.root)
    if cfg.data.vqa_rad.source == "hf":
        loaded = hf_vqa(
            "vqa_rad", root, out_dir, problems, {"train": "train", "test": "test"}, cfg.data.vqa_rad.instruction
        )
    else:
        loaded = _osf(cfg, problems, root)
    log.info("vqa_rad (%s): %d questions %s", cfg.data.vqa_rad.source, len(loaded.samples), loaded.summary["stats"])
    return loaded
