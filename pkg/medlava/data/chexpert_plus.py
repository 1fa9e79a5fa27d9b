"""CheXpert Plus (seed 002) -> question-answer samples: the release's report table (df_chexpert_plus_*.csv:
path_to_image, frontal_lateral, deid_patient_id, patient_report_date_order, section_findings,
section_impression, ...) with images under data.image_root (the CSV says .jpg; the PNG release's .png is used
when that is what is there). One report = one frontal image (the first); its QA pairs come from
medlava.data.qa. Training samples hold all pairs as one conversation (as the seed's llava-instruct-mix
format); val/test hold one question each, so infer answers and eval scores every pair."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from medlava.config import Config
from medlava.data.images import BadImage, resolve_image
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, read_csv, row_where
from medlava.data.qa import QA, LlmQA, rules_qa
from medlava.data.splits import grouped_split
from medlava.io import InputError

log = logging.getLogger(__name__)

COLUMNS = (
    "path_to_image",
    "frontal_lateral",
    "deid_patient_id",
    "patient_report_date_order",
    "section_findings",
    "section_impression",
)
_SPLITS = {"train": "train", "valid": "val", "validate": "val", "test": "test"}


def _image(root: Path, rel: str) -> str:
    """`rel`, or the same path as .png when only the PNG release's file is there; BadImage if it escapes root."""
    path = resolve_image(root, rel)
    if not path.exists() and path.with_suffix(".png").exists():
        return Path(rel).with_suffix(".png").as_posix()
    return rel


def _conversation(qa: list[QA]) -> list[dict]:
    turns = []
    for i, q in enumerate(qa):
        turns += [
            {"from": "human", "value": ("<image>\n" if i == 0 else "") + q.question},
            {"from": "gpt", "value": q.answer},
        ]
    return turns


def _single(qa: QA) -> dict:
    meta = {"task": "closed" if qa.choices else "open", "answer": qa.label or qa.answer, "qa_kind": qa.kind}
    if qa.choices:
        meta["choices"] = qa.choices
    return meta


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    d, o = cfg.data, cfg.data.chexpert_plus
    root = Path(d.root)
    image_root = d.image_dir(root)
    csv = root / o.csv
    df = read_csv(csv, problems, COLUMNS, multiline=True)  # report text holds newlines
    where = {i: row_where(csv, i, multiline=True) for i in df.index}
    for i in df.index[df["path_to_image"].isna() | df["deid_patient_id"].isna()]:
        problems.add("bad_record", where[i], "no path_to_image or deid_patient_id")
    df = df[df["path_to_image"].notna() & df["deid_patient_id"].notna()]
    for i in df.index[~df["frontal_lateral"].isin(["Frontal", "Lateral"])]:
        problems.add(
            "unknown_label", where[i], f"frontal_lateral {df.loc[i, 'frontal_lateral']!r}: expected Frontal or Lateral"
        )
    df = df[df["frontal_lateral"].isin(["Frontal"] if o.frontal_only else ["Frontal", "Lateral"])]
    df = df.assign(report_id=df["deid_patient_id"] + "-" + df["patient_report_date_order"].fillna("0"))
    reports = df.drop_duplicates("report_id").copy()  # the report's first kept image
    for col in ("section_findings", "section_impression"):
        reports[col] = reports[col].fillna("").map(lambda t: " ".join(str(t).split()))
    empty = (reports["section_findings"] == "") & (reports["section_impression"] == "")
    for i in reports.index[empty]:
        problems.add("empty_report", where[i], f"report {reports.loc[i, 'report_id']} has no findings or impression")
    reports = reports[~empty]
    if o.split == "official":
        if "split" not in reports.columns:
            raise InputError(f"{csv} has no split column; set data.chexpert_plus.split=grouped")
        split = reports["split"].map(_SPLITS)
        for i in reports.index[split.isna()]:
            problems.add("unknown_label", where[i], f"split {reports.loc[i, 'split']!r}: expected train/valid/test")
    else:
        split = grouped_split(reports.assign(_all="all"), "deid_patient_id", "_all", d.split_ratios, d.seed)
    reports = reports.assign(split=split)[split.notna()]

    images: dict[int, str] = {}
    for i, rel in reports["path_to_image"].items():
        try:
            images[i] = _image(image_root, str(rel))
        except BadImage as e:
            problems.add(e.reason, where[i], str(e))
    reports = reports[reports.index.isin(list(images))]
    if o.generator == "llm":
        cache = Path(o.llm.cache_dir) if o.llm.cache_dir else Path(cfg.output_root) / cfg.name / "qa-cache"
        gen = LlmQA(o.llm, cache, o.qa_per_report)
        texts = [
            (r.report_id, f"FINDINGS: {r.section_findings}\nIMPRESSION: {r.section_impression}")
            for r in reports.itertuples()
        ]
        all_qa = gen.generate_all(texts)
        log.info(
            "chexpert_plus: %d reports, %d requests sent to %s (the rest from %s)",
            len(texts),
            gen.requests,
            o.llm.base_url,
            cache,
        )
    else:
        all_qa = [rules_qa(r.section_findings, r.section_impression, o.qa_per_report) for r in reports.itertuples()]

    loaded = Loaded("chexpert_plus", image_root, group_name="deid_patient_id")
    stats: Counter[str] = Counter()
    for (i, row), qa in zip(reports.iterrows(), all_qa):
        base = {
            "dataset": "chexpert_plus",
            "split": row["split"],
            "group": row["deid_patient_id"],
            "report_id": row["report_id"],
            "generator": o.generator,
            **{k: row[k] for k in ("ap_pa", "age", "sex") if k in row and pd.notna(row[k])},
        }
        stats[f"qa_{len(qa)}"] += 1
        if row["split"] == "train":
            loaded.add(
                {
                    "id": row["report_id"],
                    "image": images[i],
                    "conversations": _conversation(qa),
                    "meta": {**base, "task": "open", "qa_kinds": [q.kind for q in qa]},
                },
                where[i],
            )
            continue
        for k, q in enumerate(qa):
            loaded.add(
                {
                    "id": f"{row['report_id']}-q{k}",
                    "image": images[i],
                    "conversations": _conversation([q]),
                    "meta": {**base, **_single(q)},
                },
                where[i],
            )
    loaded.summary = {
        "generator": o.generator,
        "qa_per_report": o.qa_per_report,
        "frontal_only": o.frontal_only,
        "reports": int(len(reports)),
        "qa_counts": dict(sorted(stats.items())),
        "split": {"official": True}
        if o.split == "official"
        else {"group": "deid_patient_id", "ratios": list(d.split_ratios), "seed": d.seed},
    }
    return loaded
