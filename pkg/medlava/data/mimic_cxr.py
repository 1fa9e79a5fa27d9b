"""MIMIC-CXR (seed 003) -> report-generation samples (prompt -> FINDINGS): the release's metadata, split and
CheXpert CSVs (plain or .gz), report files `files/pXX/pSUBJECT/sSTUDY.txt`, images in the MIMIC-CXR-JPG tree
(`files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`) or seed 003's flat folder (`images/{study_id}-{dicom_id}.png`).
One sample per study, from its first frontal image (PA before AP); no subject is in two splits."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from medlava.config import Config
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, bad_bytes, read_csv, read_text
from medlava.data.reports import target_text
from medlava.data.splits import grouped_split
from medlava.io import InputError

log = logging.getLogger(__name__)

METADATA, SPLIT, CHEXPERT = "mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-chexpert.csv"
OBSERVATIONS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
_LABELS = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1}
_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def _table(root: Path, name: str, required: bool = True) -> Path | None:
    """The release's CSV, plain or gzipped (MIMIC-CXR-JPG ships .csv.gz)."""
    for p in (root / name, root / f"{name}.gz"):
        if p.exists():
            return p
    if required:
        raise InputError(f"{root / name} (or .gz) not found: data.root must hold the MIMIC-CXR tables")
    return None


def report_path(subject: str, study: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}.txt"


def image_path(layout: str, subject: str, study: str, dicom: str) -> str:
    return (
        f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        if layout == "official"
        else f"images/{study}-{dicom}.png"
    )


def _chexpert(root: Path, problems: Problems) -> dict[str, dict[str, int | None]]:
    """study_id -> {observation: 1 / 0 / -1 / None}, when the release's CheXpert table is there."""
    path = _table(root, CHEXPERT, required=False)
    if path is None:
        return {}
    df = read_csv(path, problems, ("subject_id", "study_id", *OBSERVATIONS))
    out = {}
    for line, row in df.iterrows():
        bad = {k: row[k] for k in OBSERVATIONS if pd.notna(row[k]) and row[k] not in _LABELS}
        if bad:
            problems.add(
                "unknown_label",
                f"{path}:{line}",
                f"labels {bad} of study {row['study_id']}: expected 1.0, 0.0, -1.0 or blank",
            )
            continue
        out[row["study_id"]] = {k: _LABELS.get(row[k]) if pd.notna(row[k]) else None for k in OBSERVATIONS}
    return out


def _frontal_images(root: Path, views: list[str], problems: Problems) -> pd.DataFrame:
    """Metadata rows of the kept views, one per dicom, in PA-before-AP order within each study."""
    path = _table(root, METADATA)
    df = read_csv(path, problems, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    for col in ("dicom_id", "subject_id", "study_id"):
        for line in df.index[df[col].isna()]:
            problems.add("bad_record", f"{path}:{line}", f"no {col}")
        df = df[df[col].notna()]
    for line in df.index[df["dicom_id"].duplicated()]:
        problems.add("duplicate_id", f"{path}:{line}", f"dicom_id {df.loc[line, 'dicom_id']!r} is listed again")
    df = df[~df["dicom_id"].duplicated()].assign(where=[f"{path}:{i}" for i in df.index[~df["dicom_id"].duplicated()]])
    df = df[df["ViewPosition"].isin(views)]
    rank = {v: i for i, v in enumerate(views)}
    return df.assign(rank=df["ViewPosition"].map(rank)).sort_values(["study_id", "rank"], kind="stable")


def _splits(root: Path, df: pd.DataFrame, how: str, cfg: Config, problems: Problems) -> pd.Series:
    if how == "grouped":
        if cfg.data.split_file:
            from medlava.data.splits import read_split_file

            return df["study_id"].map(read_split_file(Path(cfg.data.split_file), "study_id", ids=df["study_id"]))
        return grouped_split(df.assign(_all="all"), "subject_id", "_all", cfg.data.split_ratios, cfg.data.seed)
    path = _table(root, SPLIT)
    table = read_csv(path, problems, ("dicom_id", "split"))
    for line in table.index[~table["split"].isin(list(_SPLITS))]:
        problems.add(
            "unknown_label", f"{path}:{line}", f"split {table.loc[line, 'split']!r}: expected {'/'.join(_SPLITS)}"
        )
    table = table[table["split"].isin(list(_SPLITS))].drop_duplicates("dicom_id")
    return df["dicom_id"].map(table.set_index("dicom_id")["split"].map(_SPLITS))


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    d, o = cfg.data, cfg.data.mimic_cxr
    root = Path(d.root)
    reports_root = Path(o.reports_root) if o.reports_root else root
    images = _frontal_images(root, o.views, problems)
    labels = _chexpert(root, problems)
    studies = images.drop_duplicates("study_id")  # the first kept view of each study
    studies = studies.assign(split=_splits(root, studies, o.split, cfg, problems))
    for where in studies.loc[studies["split"].isna(), "where"]:
        problems.add("bad_record", where, "the split table gives this image no split")
    studies = studies[studies["split"].notna()]
    loaded = Loaded("mimic_cxr", d.image_dir(root), group_name="subject_id")
    stats: Counter[str] = Counter()
    for row in tqdm(
        studies.to_dict("records"), desc="reports", unit="report", mininterval=5, disable=len(studies) < 1000
    ):
        subject, study, where = row["subject_id"], row["study_id"], row["where"]
        rpath = reports_root / report_path(subject, study)
        try:
            text = read_text(rpath)
        except InputError as e:
            problems.add("missing_report", where, f"report of study {study}: {e}")
            continue
        if bad_bytes(text):
            problems.add("non_utf8", str(rpath), f"report is not UTF-8 ({bad_bytes(text)})")
            continue
        if not text.strip():
            problems.add("empty_report", str(rpath), "the report file is empty")
            continue
        target = target_text(text, o.section)
        if not target:
            problems.add(
                "missing_section",
                str(rpath),
                f"no {o.section.upper().replace('_', ' + ')} section (data.mimic_cxr.section chooses another)",
            )
            continue
        meta = {
            "dataset": "mimic_cxr",
            "split": row["split"],
            "task": "report",
            "study_id": study,
            "subject_id": subject,
            "dicom_id": row["dicom_id"],
            "view": row["ViewPosition"],
            "group": subject,
            "section": o.section,
        }
        if study in labels:
            meta["chexpert"] = labels[study]
        stats[row["ViewPosition"]] += 1
        loaded.add(
            {
                "id": study,
                "image": image_path(o.image_layout, subject, study, row["dicom_id"]),
                "conversations": [{"from": "human", "value": f"<image>\n{o.prompt}"}, {"from": "gpt", "value": target}],
                "meta": meta,
            },
            where,
        )
    loaded.summary = {
        "views": o.views,
        "section": o.section,
        "image_layout": o.image_layout,
        "split": {"official": True}
        if o.split == "official"
        else {"group": "subject_id", "ratios": list(d.split_ratios), "seed": d.seed},
        "view_counts": dict(stats),
    }
    log.info("mimic_cxr: %d studies with a %s image", len(loaded.samples), "/".join(o.views))
    return loaded
