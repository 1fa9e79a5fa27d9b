"""What every adapter shares after reading its source: duplicate ids, every image opened (in parallel
threads: Pillow decodes outside the GIL), no group in two splits, then the split files, `dataset.json`
and `prepare_report.json`. dataset.json is written last, so its presence means the rest is whole."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from tqdm import tqdm

from medlava.data.images import BadImage, check_image, resolve_image
from medlava.data.problems import Problems
from medlava.data.splits import SPLITS, check_no_group_leak
from medlava.io import InputError, atomic_write_json, atomic_write_jsonl

log = logging.getLogger(__name__)

Verify = Literal["decode", "header", "none"]
_CHUNK = 2048


@dataclass
class Loaded:
    """An adapter's result: samples (meta.split and meta.group set), where each came from (for messages),
    the folder their `image` paths are relative to, and the adapter's own dataset.json fields."""

    dataset: str
    image_root: Path
    samples: list[dict] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    group_name: str = "group"
    """What meta.group holds (lesion_id, subject_id, ...), for messages."""
    class_key: str | None = None
    """A meta field with a fixed label set (summary["choices"]): dataset.json then counts it per split."""

    def add(self, sample: dict, where: str) -> None:
        self.samples.append(sample)
        self.where.append(where)


def _drop_duplicates(loaded: Loaded, problems: Problems) -> list[int]:
    first: dict[str, str] = {}
    keep = []
    for i, (s, where) in enumerate(zip(loaded.samples, loaded.where)):
        sid = str(s["id"])
        if sid in first:
            problems.add("duplicate_id", where, f"sample id {sid!r} was already used at {first[sid]}")
            continue
        first[sid] = where
        keep.append(i)
    return keep


def check_images(
    loaded: Loaded, keep: list[int], problems: Problems, verify: Verify, workers: int
) -> tuple[list[int], dict]:
    """Indices of `keep` whose image opens (every distinct image once), and the rate it was checked at."""
    users: dict[str, list[int]] = defaultdict(list)
    for i in keep:
        if loaded.samples[i].get("image"):
            users[loaded.samples[i]["image"]].append(i)
    stats = {"images": len(users), "verify": verify, "seconds": 0.0, "images_per_s": None}
    if verify == "none" or not users:
        return keep, stats

    def one(rel: str) -> BadImage | None:
        try:
            check_image(resolve_image(loaded.image_root, rel), decode=verify == "decode")
        except BadImage as e:
            return e
        return None

    start = time.perf_counter()
    bad: set[int] = set()
    names = list(users)
    bar = tqdm(total=len(names), desc="images", unit="img", mininterval=5, disable=len(names) < 1000)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for lo in range(0, len(names), _CHUNK):  # in chunks: an error stops the check within one chunk
            chunk = names[lo : lo + _CHUNK]
            for rel, err in zip(chunk, pool.map(one, chunk)):
                bar.update()
                if err is None:
                    continue
                idx = users[rel]
                more = f" (used by {len(idx)} samples)" if len(idx) > 1 else ""
                for n, i in enumerate(idx):
                    if n == 0:
                        problems.add(err.reason, loaded.where[i], f"{err}{more}")
                    elif err.reason in problems.skip:
                        problems.add(err.reason, loaded.where[i], str(err))  # each skipped sample is counted
                bad.update(idx)
    bar.close()
    seconds = time.perf_counter() - start
    stats.update(seconds=round(seconds, 3), images_per_s=round(len(users) / seconds, 1) if seconds else None)
    log.info(
        "checked %d images (%s) in %.1f s: %s images/s with %d threads",
        len(users),
        verify,
        seconds,
        stats["images_per_s"],
        workers,
    )
    return [i for i in keep if i not in bad], stats


def finish(loaded: Loaded, out_dir: Path, problems: Problems, verify: Verify = "decode", workers: int = 4) -> dict:
    """Validate, then (unless checking) write `{train,val,test}.jsonl`, `dataset.json` and
    `prepare_report.json` to `out_dir`; return the dataset.json content."""
    keep = _drop_duplicates(loaded, problems)
    keep, image_stats = check_images(loaded, keep, problems, verify, workers)
    samples = [loaded.samples[i] for i in keep]
    if samples and all((s.get("meta") or {}).get("group") is not None for s in samples):
        groups = pd.DataFrame(
            {
                loaded.group_name: [str(s["meta"]["group"]) for s in samples],
                "split": [s["meta"]["split"] for s in samples],
            }
        )
        try:
            check_no_group_leak(groups, loaded.group_name, "split")
        except InputError as e:
            problems.fatal(e, "group_leak")
    by_split = {s: [x for x in samples if x["meta"]["split"] == s] for s in SPLITS}
    counts = {s: len(v) for s, v in by_split.items()}
    report = {**problems.report(), "dataset": loaded.dataset, "splits": counts, "image_check": image_stats}
    atomic_write_json(Path(out_dir) / "prepare_report.json", report)
    if problems.check:
        return {"dataset": loaded.dataset, "splits": counts}
    if not samples:
        raise InputError(f"{loaded.dataset}: no samples are left to write (all were skipped or none were found)")
    for split, rows in by_split.items():
        atomic_write_jsonl(Path(out_dir) / f"{split}.jsonl", rows)
    summary = {
        "dataset": loaded.dataset,
        "image_root": str(Path(loaded.image_root).resolve()),
        "splits": counts,
        "skipped": report["skipped"],
        **loaded.summary,
    }
    if loaded.class_key:
        summary["class_counts"] = {
            s: {c: sum(x["meta"][loaded.class_key] == c for x in rows) for c in loaded.summary["choices"]}
            for s, rows in by_split.items()
        }
    atomic_write_json(Path(out_dir) / "dataset.json", summary)
    return summary
