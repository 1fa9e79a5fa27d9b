"""OmniMedVQA (Hu et al. 2024) -> multiple-choice samples, all in the test split (it is an evaluation benchmark).

The release: `QA_information/Open-access/<source dataset>.json` (and `Restricted-access/`, whose images are not
distributed), each a JSON array of {dataset, question_id, question_type, question, gt_answer, image_path,
option_A .. option_D (two to four of them), modality_type}; image_path is relative to data.root (`Images/...`).
gt_answer is an option's text; its letter is the answer. One released file writes `modality` for modality_type;
both are read.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from medlava.config import Config
from medlava.data.benchmark import mc_prompt, mc_sample
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, read_json_records
from medlava.io import InputError

log = logging.getLogger(__name__)

FIELDS = ("question_id", "question", "gt_answer", "image_path", "option_A", "option_B")
LETTERS = ("A", "B", "C", "D")


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    root = Path(cfg.data.root)
    folders = ["Open-access"] + (["Restricted-access"] if cfg.data.omnimedvqa.access == "all" else [])
    loaded = Loaded("omnimedvqa", cfg.data.image_dir(root))
    stats: Counter[str] = Counter()
    for folder in folders:
        files = sorted((root / "QA_information" / folder).glob("*.json"))
        if not files:
            problems.fatal(
                InputError(
                    f"{root / 'QA_information' / folder}: no *.json files (OmniMedVQA's question "
                    "files; data.root is the folder holding QA_information/ and Images/)"
                )
            )
        for path in files:
            for where, rec in read_json_records(path, problems):
                missing = [k for k in FIELDS if rec.get(k) is None or str(rec[k]).strip() == ""]
                if missing:
                    problems.add(
                        "bad_record", where, f"no {', '.join(missing)} (OmniMedVQA fields: {', '.join(FIELDS)})"
                    )
                    continue
                options = {
                    k: str(rec[f"option_{k}"]).strip() for k in LETTERS if str(rec.get(f"option_{k}") or "").strip()
                }
                answer = next((k for k, v in options.items() if v == str(rec["gt_answer"]).strip()), None)
                if answer is None:
                    problems.add(
                        "unknown_label",
                        where,
                        f"gt_answer {rec['gt_answer']!r} is none of the options {list(options.values())}",
                    )
                    continue
                meta = {
                    "dataset": "omnimedvqa",
                    "split": "test",
                    "access": folder,
                    "source_dataset": rec.get("dataset"),
                    "question_type": rec.get("question_type"),
                    "modality_type": rec.get("modality_type", rec.get("modality")),
                }
                loaded.add(
                    mc_sample(
                        str(rec["question_id"]),
                        str(rec["image_path"]),
                        mc_prompt(rec["question"], options),
                        options,
                        answer,
                        meta,
                    ),
                    where,
                )
                stats[folder] += 1
    loaded.summary = {"access": folders, "split": {"official": True, "all": "test"}, "stats": dict(stats)}
    log.info("omnimedvqa: %d questions %s", len(loaded.samples), dict(stats))
    return loaded
