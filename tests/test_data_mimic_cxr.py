"""MIMIC-CXR: tables + report files + images (official tree and seed 003's flat folder) -> one report sample
per study from a frontal image; FINDINGS/IMPRESSION by section rules; no subject in two splits; bad reports."""

from __future__ import annotations

import itertools
import json
import shutil
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from conftest import prepare_dataset, rows
from medlava.data.mimic_cxr import CHEXPERT, METADATA, SPLIT, report_path
from medlava.data.reports import sections, target_text
from medlava.io import InputError
from synthetic.mimic import make_synthetic_mimic

prepare = partial(prepare_dataset, "mimic_cxr")


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    return make_synthetic_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr")


def test_section_rules():
    text = (
        " FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n FINDINGS: \n\n No effusion.\n Heart normal.\n\n"
        " IMPRESSIONS:\n No acute process.\n"
    )
    assert sections(text) == {
        "preamble": "FINAL REPORT",
        "examination": "CHEST (PA AND LAT)",
        "findings": "No effusion. Heart normal.",
        "impression": "No acute process.",
    }
    assert sections("CHEST, PA AND LATERAL: Clear lungs.\nCONCLUSION: Normal.") == {
        "findings": "Clear lungs.",
        "impression": "Normal.",
    }
    assert target_text("FINDINGS AND IMPRESSION: Normal chest.", "findings") == ""  # impression ranks first
    assert target_text("FINDINGS: A.\nIMPRESSION: B.", "findings_impression") == "A. B."
    assert target_text("FINDINGS:\n\nIMPRESSION: B.", "findings") == ""  # an empty section is absent


@pytest.mark.parametrize("layout", ["official", "flat"])
def test_one_sample_per_study_from_a_frontal_image(mimic, tmp_path, layout):
    root = mimic if layout == "official" else make_synthetic_mimic(tmp_path / "flat", layout="flat")
    run = prepare(tmp_path, root, f"data.mimic_cxr.image_layout={layout}", "data.mimic_cxr.section=impression")
    meta = pd.read_csv(root / METADATA, dtype=str)
    split = pd.read_csv(root / SPLIT, dtype=str).set_index("dicom_id")["split"]
    out = rows(run)
    n_studies = meta["study_id"].nunique()
    assert sum(len(v) for v in out.values()) == n_studies  # every study has a frontal view and an impression
    subjects = [{r["meta"]["subject_id"] for r in v} for v in out.values()]
    assert not any(a & b for a, b in itertools.combinations(subjects, 2))  # no patient in two splits
    by_dicom = meta.set_index("dicom_id")
    for s, rs in out.items():
        for r in rs:
            m = r["meta"]
            dicom = by_dicom.loc[m["dicom_id"]]
            assert dicom["ViewPosition"] in ("PA", "AP") and dicom["study_id"] == r["id"] == m["study_id"]
            assert {"train": "train", "validate": "val", "test": "test"}[split[m["dicom_id"]]] == s == m["split"]
            assert m["group"] == m["subject_id"] == dicom["subject_id"] and m["task"] == "report"
            expected = (
                f"files/p{m['subject_id'][:2]}/p{m['subject_id']}/s{r['id']}/{m['dicom_id']}.jpg"
                if layout == "official"
                else f"images/{r['id']}-{m['dicom_id']}.png"
            )
            assert r["image"] == expected and (root / expected).is_file()
            report = (root / report_path(m["subject_id"], r["id"])).read_text()
            assert r["conversations"] == [
                {"from": "human", "value": "<image>\nDescribe the findings of the chest X-ray."},
                {"from": "gpt", "value": target_text(report, "impression")},
            ]
            assert sum(v == 1 for v in m["chexpert"].values()) == 1  # the study's labels from the CheXpert table


def test_findings_target_skips_reports_without_findings(mimic, tmp_path):
    with pytest.raises(InputError, match=r"s\d+\.txt: no FINDINGS section .*add missing_section to data.skip"):
        prepare(tmp_path, mimic, run_id="strict")
    run = prepare(tmp_path, mimic, "data.skip=[missing_section]", run_id="skip")
    meta = pd.read_csv(mimic / METADATA, dtype=str)
    no_findings = [
        s
        for s, sub in meta.groupby("study_id")["subject_id"].first().items()
        if "FINDINGS:" not in (mimic / report_path(sub, s)).read_text()
    ]
    assert len(no_findings) > 0
    summary = json.loads((run / "dataset.json").read_text())
    assert summary["skipped"]["missing_section"] == len(no_findings)
    assert sum(summary["splits"].values()) == meta["study_id"].nunique() - len(no_findings)
    assert summary["view_counts"] == {
        v: n for v, n in pd.Series([r["meta"]["view"] for rs in rows(run).values() for r in rs]).value_counts().items()
    }


def test_grouped_split_by_subject(mimic, tmp_path):
    run = prepare(
        tmp_path,
        mimic,
        "data.mimic_cxr.split=grouped",
        "data.mimic_cxr.section=impression",
        "data.split_ratios=[0.5,0.25,0.25]",
        run_id="g",
    )
    out = rows(run)
    subjects = [{r["meta"]["subject_id"] for r in v} for v in out.values()]
    assert sum(map(len, subjects)) == 9 and all(subjects)  # all 9 patients, each split holds some
    assert not any(a & b for a, b in itertools.combinations(subjects, 2))


def test_bad_reports_and_tables(mimic, tmp_path):
    root = Path(shutil.copytree(mimic, tmp_path / "bad"))
    meta = pd.read_csv(root / METADATA, dtype=str)
    studies = meta.drop_duplicates("study_id")[["subject_id", "study_id"]].to_numpy()
    (root / report_path(*studies[0])).write_text("   \n")  # empty
    (root / report_path(*studies[1])).write_bytes("FINDINGS: small effusion\nIMPRESSION: caf\xe9".encode("latin-1"))
    (root / report_path(*studies[2])).unlink()
    labels = pd.read_csv(root / CHEXPERT, dtype=str)
    labels.loc[3, "Edema"] = "2.0"
    labels.to_csv(root / CHEXPERT, index=False)
    base = ("data.mimic_cxr.section=impression",)
    with pytest.raises(InputError, match=rf"{CHEXPERT}:5: labels \{{'Edema': '2.0'\}}.*expected 1.0, 0.0, -1.0"):
        prepare(tmp_path, root, *base, run_id="a")
    with pytest.raises(InputError, match=rf"s{studies[0][1]}.txt: the report file is empty"):
        prepare(tmp_path, root, *base, "data.skip=[unknown_label]", run_id="b")
    with pytest.raises(InputError, match=rf"s{studies[1][1]}.txt: report is not UTF-8 \(line 2, byte 0xe9\)"):
        prepare(tmp_path, root, *base, "data.skip=[unknown_label,empty_report]", run_id="c")
    with pytest.raises(InputError, match=rf"{METADATA}:\d+: report of study {studies[2][1]}: .* not found"):
        prepare(tmp_path, root, *base, "data.skip=[unknown_label,empty_report,non_utf8]", run_id="d")
    run = prepare(tmp_path, root, *base, "data.skip=[unknown_label,empty_report,non_utf8,missing_report]", run_id="e")
    summary = json.loads((run / "dataset.json").read_text())
    assert {k: v for k, v in summary["skipped"].items() if v} == {
        "unknown_label": 1,
        "empty_report": 1,
        "non_utf8": 1,
        "missing_report": 1,
    }
    assert sum(summary["splits"].values()) == len(studies) - 3  # the unknown label only drops the label row
