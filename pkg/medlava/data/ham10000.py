"""HAM10000 as released (`HAM10000_metadata.csv` + `HAM10000_images_part_1/2`, or one `images/` folder) ->
closed-VQA samples (the prepared JSONL), split by lesion so no lesion is in two splits."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from medlava.config import Config
from medlava.data.prepare import Loaded, finish
from medlava.data.problems import Problems, read_csv
from medlava.data.splits import check_no_group_leak, grouped_split, read_split_file
from medlava.io import InputError

log = logging.getLogger(__name__)

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
QUESTION = "What is the lesion type? Choose one of: akiec, bcc, bkl, df, mel, nv, vasc."
METADATA = "HAM10000_metadata.csv"
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _fail_at(
    csv: Path, rows: pd.DataFrame, what: str, fix: str, problems: Problems | None = None, reason: str = "bad_record"
) -> pd.Index:
    """Raise naming the first offending line (the frame's index is the CSV line number); or, when checking or
    when `reason` may be skipped, report every row. Returns the rows' index (to drop)."""
    if len(rows) and (problems is None or not (problems.check or reason in problems.skip)):
        line, row = next(rows.iterrows())
        more = f" ({len(rows)} such rows)" if len(rows) > 1 else ""
        raise InputError(f"{csv}:{line}: {what.format(**row)}{more}; {fix}")
    for line, row in rows.iterrows():
        problems.add(reason, f"{csv}:{line}", f"{what.format(**row)}; {fix}")
    return rows.index


def read_metadata(csv: Path, problems: Problems | None = None) -> pd.DataFrame:
    """The metadata CSV, validated, indexed by its line numbers; `age` as float, other missing values NaN.
    With `problems`, bad rows are reported there (and dropped) instead of raising at the first."""
    if not Path(csv).is_file():
        raise InputError(
            f"{csv} not found: data.root must hold the HAM10000 release (metadata CSV + image "
            "folders), or set data.synthetic to generate one"
        )
    # Only empty fields are missing: a literal "NA" or "null" is a value to be reported, not guessed at. A row
    # with bytes that are not UTF-8 is a problem of its own.
    df = read_csv(csv, problems or Problems(), COLUMNS)
    if df.empty:
        raise InputError(f"{csv} lists no images")
    for col in ("lesion_id", "image_id"):
        df = df.drop(
            _fail_at(csv, df[df[col].isna()], f"no {col}", "every image needs a lesion_id and an image_id", problems)
        )
    df = df.drop(
        _fail_at(
            csv,
            df[~df["dx"].isin(CLASSES)],
            "unknown dx {dx!r} for {image_id}",
            f"expected one of {list(CLASSES)}",
            problems,
            "unknown_label",
        )
    )
    age = pd.to_numeric(df["age"], errors="coerce")
    df = df.drop(
        _fail_at(
            csv,
            df[age.isna() & df["age"].notna()],
            "age {age!r} of {image_id} is not a number",
            "write a number or leave it empty",
            problems,
        )
    )
    dupes = df[df["image_id"].duplicated(keep=False)]
    if len(dupes) and (problems is None or not (problems.check or "duplicate_id" in problems.skip)):
        first = dupes["image_id"].iloc[0]
        lines = dupes.index[dupes["image_id"] == first].tolist()
        raise InputError(
            f"{csv}: image_id {first!r} is listed on lines {lines} ({dupes['image_id'].nunique()} "
            "duplicated image_ids); each image must appear once"
        )
    later = df[df["image_id"].duplicated(keep="first")]
    df = df.drop(
        _fail_at(
            csv, later, "image_id {image_id!r} is listed again", "each image must appear once", problems, "duplicate_id"
        )
    )
    return df.assign(age=age[df.index])


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
    return {
        "id": row["image_id"],
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": row["dx"]}],
        "meta": {
            "dataset": "ham10000",
            "split": split,
            "task": "closed",
            "choices": list(CLASSES),
            "answer": row["dx"],
            "label": row["dx"],
            "group": row["lesion_id"],
            **{k: _missing_to_none(row[k]) for k in ("age", "sex", "localization", "dx_type")},
        },
    }


def load_ham10000(
    root: Path,
    problems: Problems,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    split_file: Path | None = None,
) -> Loaded:
    """Samples of the release at `root`, split by lesion and stratified by dx, or as `split_file` (CSV
    image_id,split) says. An image not in the release folders is a `missing_image` problem."""
    root = Path(root)
    csv = root / METADATA
    df = read_metadata(csv, problems)
    images = find_images(root)
    present = df["image_id"].isin(images)
    if not present.all():
        fix = (
            f"put it in {root}/{{{','.join(IMAGE_DIRS)}}} as {'/'.join(IMAGE_SUFFIXES)}, or set "
            "data.skip_missing_images=true to skip and count missing images"
        )
        absent = df[~present]
        _fail_at(csv, absent, "image {image_id} not found", fix, problems, "missing_image")
        log.warning(
            "%s: skipping %d images that are not under %s, e.g. %s",
            csv,
            len(absent),
            root,
            absent["image_id"].head(5).tolist(),
        )
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
    loaded = Loaded(
        "ham10000",
        root,
        summary={"choices": list(CLASSES), "split": split_info},
        group_name="lesion_id",
        class_key="label",
    )
    for line, row in zip(df.index, df.to_dict("records")):
        loaded.add(_sample(row, images[row["image_id"]].relative_to(root).as_posix(), row["split"]), f"{csv}:{line}")
    return loaded


def prepare_ham10000(
    root: Path,
    out_dir: Path,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    split_file: Path | None = None,
    skip_missing: bool = False,
) -> dict:
    """Write `out_dir/{train,val,test}.jsonl` and `out_dir/dataset.json` (last, so its presence means the
    rest is whole); return the dataset.json content. A missing image is an error, or skipped and counted
    when `skip_missing`."""
    problems = Problems(skip={"missing_image"} if skip_missing else set())
    return finish(load_ham10000(root, problems, ratios, seed, split_file), out_dir, problems)


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    """The registry's entry: data.root as released (the registry writes a synthetic release there first
    when data.synthetic is set)."""
    d = cfg.data
    return load_ham10000(Path(d.root), problems, d.split_ratios, d.seed, Path(d.split_file) if d.split_file else None)
