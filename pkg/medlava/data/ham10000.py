"""HAM10000 as released (`HAM10000_metadata.csv` + `HAM10000_images_part_1/2` or one folder) -> closed-VQA
samples, split by lesion so no lesion is in two splits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medlava.data.splits import check_no_group_leak, grouped_split
from medlava.io import InputError, atomic_write_json, atomic_write_jsonl

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
QUESTION = "What is the lesion type? Choose one of: akiec, bcc, bkl, df, mel, nv, vasc."
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images")


def _index_images(root: Path) -> dict[str, Path]:
    found = {}
    for d in IMAGE_DIRS:
        for p in (root / d).glob("*") if (root / d).is_dir() else []:
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                found[p.stem] = p
    return found


def _value(v):
    return None if pd.isna(v) else v


def prepare_ham10000(root: Path, out_dir: Path, ratios=(0.7, 0.15, 0.15), seed: int = 0,
                     split_file: Path | None = None, skip_missing: bool = False) -> dict:
    root = Path(root)
    csv = root / "HAM10000_metadata.csv"
    if not csv.exists():
        raise InputError(f"{csv} not found: data.root must hold the HAM10000 release (metadata CSV + image folders)")
    df = pd.read_csv(csv, dtype={"lesion_id": str, "image_id": str, "dx": str}, keep_default_na=True)
    missing_cols = [c for c in COLUMNS if c not in df.columns]
    if missing_cols:
        raise InputError(f"{csv}: missing columns {missing_cols}; expected {list(COLUMNS)}")
    bad = df[~df["dx"].isin(CLASSES)]
    if len(bad):
        line = bad.index[0] + 2  # header is line 1
        raise InputError(f"{csv}:{line}: unknown dx {bad['dx'].iloc[0]!r}; expected one of {list(CLASSES)}")
    dupes = df[df["image_id"].duplicated()]["image_id"].tolist()
    if dupes:
        raise InputError(f"{csv}: duplicated image_id {dupes[:5]}; each image must appear once")
    images = _index_images(root)
    present = df["image_id"].isin(images)
    if not present.all():
        absent = df.loc[~present, "image_id"].tolist()
        if not skip_missing:
            raise InputError(f"{csv}: {len(absent)} images not found under {root}/{{{','.join(IMAGE_DIRS)}}}, e.g. "
                             f"{absent[:5]}; add them or set data.skip_missing_images=true to skip and count them")
        df = df[present]
    skipped = {"missing_image": int((~present).sum())}
    if split_file is not None:
        splits = pd.read_csv(split_file, dtype=str).set_index("image_id")["split"]
        df = df.assign(split=df["image_id"].map(splits))
        if df["split"].isna().any() or not df["split"].isin(["train", "val", "test"]).all():
            raise InputError(f"{split_file}: every image_id needs a split of train/val/test")
    else:
        df = df.assign(split=grouped_split(df, "lesion_id", "dx", tuple(ratios), seed))
    check_no_group_leak(df, "lesion_id", "split")

    out_dir = Path(out_dir)
    counts = {}
    for split in ("train", "val", "test"):
        part = df[df["split"] == split]
        rows = [{"id": r.image_id, "image": str(images[r.image_id].relative_to(root)),
                 "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                                   {"from": "gpt", "value": r.dx}],
                 "meta": {"dataset": "ham10000", "split": split, "task": "closed", "choices": list(CLASSES),
                          "answer": r.dx, "label": r.dx, "group": r.lesion_id, "age": _value(r.age),
                          "sex": _value(r.sex), "localization": _value(r.localization), "dx_type": _value(r.dx_type)}}
                for r in part.itertuples()]
        atomic_write_jsonl(out_dir / f"{split}.jsonl", rows)
        counts[split] = part["dx"].value_counts().reindex(CLASSES, fill_value=0).astype(int).to_dict()
    summary = {"dataset": "ham10000", "image_root": str(root.resolve()), "choices": list(CLASSES),
               "splits": {s: sum(c.values()) for s, c in counts.items()}, "class_counts": counts, "skipped": skipped}
    atomic_write_json(out_dir / "dataset.json", summary)
    return summary
