"""MedXpertQA MM (Zuo et al. 2025; TsinghuaC3I/MedXpertQA) -> multiple-choice samples.

The release: `MM/test.jsonl` (2,000 questions) and `MM/dev.jsonl` (5, for few-shot prompts) of {id, question,
options {A..E}, label, images [file names], medical_task, body_system, question_type}, images in `images/` (from
images.zip). dev is the val split. A question may show several images: they are put side by side in one
(data.medxpertqa.images=all) or only the first is shown.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from medlava.config import Config
from medlava.data.benchmark import ImageStore, combine_files, mc_prompt, mc_sample
from medlava.data.images import BadImage, resolve_image
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, read_jsonl_records
from medlava.io import InputError

log = logging.getLogger(__name__)

SPLITS = {"val": "dev.jsonl", "test": "test.jsonl"}
META = ("medical_task", "body_system", "question_type")


def _prompt(question: str, options: dict[str, str]) -> str:
    """The question, its options (unless the released text lists them already, as "Answer Choices: (A) ..."), the
    letter instruction."""
    return mc_prompt(question, {} if "Answer Choices:" in question else options)


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    root = Path(cfg.data.root)
    source = cfg.data.image_dir(root / "images")
    store = ImageStore(out_dir)
    loaded = Loaded("medxpertqa", store.root)
    stats: Counter[str] = Counter()
    for split, name in SPLITS.items():
        path = root / "MM" / name
        if not path.exists():
            problems.fatal(InputError(f"{path} not found (data.root is the folder holding MM/ and images/)"))
            continue
        for where, rec in read_jsonl_records(path, problems):
            options, label, names = rec.get("options"), str(rec.get("label") or "").strip(), rec.get("images")
            if (
                not rec.get("id")
                or not str(rec.get("question") or "").strip()
                or not isinstance(options, dict)
                or len(options) < 2
                or not isinstance(names, list)
                or not names
            ):
                problems.add(
                    "bad_record",
                    where,
                    "a MedXpertQA MM question needs id, question, options {A: ...} and images [...]",
                )
                continue
            if label not in options:
                problems.add("unknown_label", where, f"label {label!r} is not one of the options {list(options)}")
                continue
            options = {str(k): str(v) for k, v in options.items()}
            files = names if cfg.data.medxpertqa.images == "all" else names[:1]
            try:
                image = combine_files(
                    store, [resolve_image(source, str(f)) for f in files], str(rec["id"]), str(rec["id"])
                )
            except BadImage as e:
                problems.add(e.reason, where, str(e))
                continue
            meta = {"dataset": "medxpertqa", "split": split, "n_images": len(names), **{k: rec.get(k) for k in META}}
            loaded.add(
                mc_sample(str(rec["id"]), image, _prompt(str(rec["question"]), options), options, label, meta), where
            )
            stats[f"{split}_images_{min(len(names), 3)}{'+' if len(names) > 3 else ''}"] += 1
    loaded.summary = {
        "images": cfg.data.medxpertqa.images,
        "split": {"official": True, "val": "dev"},
        "stats": dict(sorted(stats.items())),
    }
    log.info("medxpertqa: %d questions %s", len(loaded.samples), dict(stats))
    return loaded
