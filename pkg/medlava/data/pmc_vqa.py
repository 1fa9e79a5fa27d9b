"""PMC-VQA (Zhang et al. 2023; xmcmic/PMC-VQA) -> multiple-choice samples, from its CSVs and figure folder.

Version 1: train.csv, test.csv, test_clean.csv (Figure_path, Question, Answer, Choice A..D as "A:text", Answer_label)
with images.zip's folder; version 2: train_2.csv, test_2.csv (index, Figure_path, Caption, Question, Choice A..D,
Answer as the letter, split) with images_2.zip's `figures/`. Either is read: the letter comes from Answer_label, else
from an Answer that is a single letter. The test split is data.pmc_vqa.test_file (test_clean.csv by default, the
2,000-question set papers report); there is no validation split.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from medlava.config import Config
from medlava.data.benchmark import mc_prompt, mc_sample
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, read_csv, row_where
from medlava.io import InputError

log = logging.getLogger(__name__)

COLUMNS = ("Figure_path", "Question", "Choice A", "Choice B", "Choice C", "Choice D")
LETTERS = ("A", "B", "C", "D")
_PREFIX = re.compile(r"^\s*[A-D]\s*[:.]\s*")  # "A:Diffuse uptake", " B: ..." (the released choice cells)


def _image_root(cfg: Config, root: Path) -> Path:
    if cfg.data.image_root:
        return Path(cfg.data.image_root)
    return next((root / d for d in ("figures", "images") if (root / d).is_dir()), root / "figures")


def _letter(row, path: Path, n: int, problems: Problems) -> str | None:
    label = row.get("Answer_label")
    if isinstance(label, str) and label.strip().upper() in LETTERS:
        return label.strip().upper()
    answer = row.get("Answer")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        return answer.strip().upper()
    problems.add(
        "unknown_label",
        row_where(path, n, True),
        f"answer label {label!r} / Answer {answer!r} is not one of A-D (PMC-VQA's Answer_label, or version 2's Answer)",
    )
    return None


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    root, o = Path(cfg.data.root), cfg.data.pmc_vqa
    loaded = Loaded("pmc_vqa", _image_root(cfg, root))
    stats: Counter[str] = Counter()
    for split, name in (("train", o.train_file), ("test", o.test_file)):
        if not name:
            continue
        path = root / name
        try:
            df = read_csv(path, problems, COLUMNS, multiline=True)
        except InputError as e:
            problems.fatal(e)
            continue
        for n, row in df.iterrows():
            row = row.to_dict()
            where = row_where(path, n, True)
            empty = [c for c in COLUMNS if not isinstance(row.get(c), str) or not row[c].strip()]
            if empty:
                problems.add("bad_record", where, f"empty {', '.join(empty)}")
                continue
            letter = _letter(row, path, n, problems)
            if letter is None:
                continue
            options = {k: _PREFIX.sub("", row[f"Choice {k}"]).strip() for k in LETTERS}
            meta = {"dataset": "pmc_vqa", "split": split, "source": name, "figure": row["Figure_path"]}
            if isinstance(row.get("index"), str):
                meta["index"] = row["index"]
            prompt = mc_prompt(row["Question"], options)
            loaded.add(mc_sample(f"{split}-{n}", row["Figure_path"].strip(), prompt, options, letter, meta), where)
            stats[split] += 1
    loaded.summary = {
        "train_file": o.train_file,
        "test_file": o.test_file,
        "split": {"official": True, "files": [o.train_file, o.test_file]},
        "stats": dict(stats),
    }
    log.info("pmc_vqa: %d questions %s", len(loaded.samples), dict(stats))
    return loaded
