"""HAM10000 as released (`HAM10000_metadata.csv` + `HAM10000_images_part_1/2`, or one `images/` folder) ->
closed-VQA samples (DESIGN.md JSONL), split by lesion so no lesion is in two splits."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from medlava.data.splits import SPLITS, check_no_group_leak, grouped_split, read_split_file
from medlava.io import InputError, atomic_write_json, atomic_write_jsonl

log = logging.getLogger(__name__)

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
QUESTION = "What is the lesion type? Choose one of: akiec, bcc, bkl, df, mel, nv, vasc."
METADATA = "HAM10000_metadata.csv"
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _fail_at(csv: Path, rows: pd.DataFrame, what: str, fix: str) -> None:
    """Raise naming the first offending line (the frame's index is the CSV line number)."""
    if len(rows):
        line, row = next(rows.iterrows())
        more = f" ({len(rows)} such rows)" if len(rows) > 1 else ""
        raise InputError(f"{csv}:{line}: {what.format(**row)}{more}; {fix}")


def read_metadata(csv: Path) -> pd.DataFrame:
    """The metadata CSV, validated, indexed by its line numbers; `age` as float, other missing values NaN."""
    try:
        # Only empty fields are missing: a literal "NA" or "null" is a value to be reported, not guessed at.
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=False)
    except FileNotFoundError:
        raise InputError(f"{csv} not found: data.root must hold the HAM10000 release (metadata CSV + image "
                         "folders), or set data.synthetic to generate one") from None
    except (OSError, ValueError) as e:  # pandas' parser and decoding errors are ValueErrors
        raise InputError(f"{csv} cannot be read as CSV ({e}); expected columns {','.join(COLUMNS)}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{csv}: missing columns {missing}; expected {','.join(COLUMNS)} (found {list(df.columns)})")
    df.index = df.index + 2  # index = line number: line 1 is the header, blank lines were kept as empty rows
    df = df.dropna(how="all")
    if df.empty:
        raise InputError(f"{csv} lists no images")
    for col in ("lesion_id", "image_id"):
        _fail_at(csv, df[df[col].isna()], f"no {col}", "every image needs a lesion_id and an image_id")
    _fail_at(csv, df[~df["dx"].isin(CLASSES)], "unknown dx {dx!r} for {image_id}", f"expected one of {list(CLASSES)}")
    age = pd.to_numeric(df["age"], errors="coerce")
    _fail_at(csv, df[age.isna() & df["age"].notna()], "age {age!r} of {image_id} is not a number",
             "write a number or leave it empty")
    dupes = df[df["image_id"].duplicated(keep=False)]
    if len(dupes):
        first = dupes["image_id"].iloc[0]
        lines = dupes.index[dupes["image_id"] == first].tolist()
        raise InputError(f"{csv}: image_id {first!r} is listed on lines {lines} ({dupes['image_id'].nunique()} "
                         "duplicated image_ids); each image must appear once")
    return df.assign(age=age)


def find_images(root: Path) -> dict[str, Path]:
    """image_id -> file, from the release's image folders under root."""
    found: dict[str, Path] = {}
    for d in IMAGE_DIRS:
        if not (root / d).is_dir():
            continue
        for p in (root / d).iterdir():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.stem in found:
                raise InputError(f"image {p.stem} is both {found[p.stem]} and {p}; keep one of them")
            found[p.stem] = p
    return found


def _missing_to_none(v: object) -> object:
    return None if pd.isna(v) else v


def _sample(row: dict, image: str, split: str) -> dict:
    return {"id": row["image_id"], "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                              {"from": "gpt", "value": row["dx"]}],
            "meta": {"dataset": "ham10000", "split": split, "task": "closed", "choices": list(CLASSES),
                     "answer": row["dx"], "label": row["dx"], "group": row["lesion_id"],
                     **{k: _missing_to_none(row[k]) for k in ("age", "sex", "localization", "dx_type")}}}


def prepare_ham10000(root: Path, out_dir: Path, ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     seed: int = 0, split_file: Path | None = None, skip_missing: bool = False) -> dict:
    """Write `out_dir/{train,val,test}.jsonl` and `out_dir/dataset.json` (last, so its presence means the
    rest is whole); return the dataset.json content. Split by lesion and stratified by dx, or as `split_file`
    (CSV image_id,split) says. A missing image is an error, or skipped and counted when `skip_missing`."""
    root, out_dir = Path(root), Path(out_dir)
    csv = root / METADATA
    df = read_metadata(csv)
    images = find_images(root)
    present = df["image_id"].isin(images)
    if not present.all():
        absent = df[~present]
        if not skip_missing:
            _fail_at(csv, absent, "image {image_id} not found",
                     f"put it in {root}/{{{','.join(IMAGE_DIRS)}}} as {'/'.join(IMAGE_SUFFIXES)}, or set "
                     "data.skip_missing_images=true to skip and count missing images")
        log.warning("%s: skipping %d images that are not under %s, e.g. %s", csv, len(absent), root,
                    absent["image_id"].head(5).tolist())
        df = df[present]
        if df.empty:
            raise InputError(f"none of the images in {csv} are under {root}/{{{','.join(IMAGE_DIRS)}}}")
    if split_file is not None:
        splits = read_split_file(split_file, "image_id", ids=df["image_id"])
        df = df.assign(split=df["image_id"].map(splits))
        split_info = {"file": str(Path(split_file).resolve())}
    else:
        df = df.assign(split=grouped_split(df, "lesion_id", "dx", ratios, seed))
        split_info = {"group": "lesion_id", "stratify": "dx", "ratios": list(ratios), "seed": seed}
    check_no_group_leak(df, "lesion_id", "split")

    class_counts = {}
    for split in SPLITS:
        part = df[df["split"] == split]
        atomic_write_jsonl(out_dir / f"{split}.jsonl",
                           (_sample(row, images[row["image_id"]].relative_to(root).as_posix(), split)
                            for row in part.to_dict("records")))
        class_counts[split] = {dx: int(n) for dx, n in part["dx"].value_counts().reindex(CLASSES, fill_value=0).items()}
    summary = {"dataset": "ham10000", "image_root": str(root.resolve()), "choices": list(CLASSES),
               "splits": {s: sum(c.values()) for s, c in class_counts.items()}, "class_counts": class_counts,
               "skipped": {"missing_image": int((~present).sum())}, "split": split_info}
    atomic_write_json(out_dir / "dataset.json", summary)
    return summary
