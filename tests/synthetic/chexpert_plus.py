"""A small CheXpert Plus: `df_chexpert_plus_240401.csv` with the release's columns (multi-line report text
included) and the PNG release's images (`PNG/train/patientNNNNN/studyK/view1_frontal.png` while the CSV
says .jpg, as in the real release). For tests and demos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CSV = "df_chexpert_plus_240401.csv"
COLUMNS = (
    "path_to_image",
    "path_to_dcm",
    "frontal_lateral",
    "ap_pa",
    "deid_patient_id",
    "patient_report_date_order",
    "report",
    "section_narrative",
    "section_clinical_history",
    "section_history",
    "section_comparison",
    "section_technique",
    "section_procedure_comments",
    "section_findings",
    "section_impression",
    "section_end_of_impression",
    "section_summary",
    "section_accession_number",
    "age",
    "sex",
    "race",
    "ethnicity",
    "interpreter_needed",
    "insurance_type",
    "recent_bmi",
    "deceased",
    "split",
)
FINDINGS = (
    "There is a small left pleural effusion. The heart is moderately enlarged. No pneumothorax.",
    "Mild bibasilar atelectasis. No focal consolidation. No pleural effusion.",
    "The lungs are clear. Heart size is normal. No pneumothorax or pleural effusion.",
    "Large right pneumothorax. Right chest tube in place.",
)


def make_synthetic_chexpert_plus(root: Path, n_patients: int = 8, seed: int = 0, image_dir: str = "PNG") -> Path:
    """Patients with 1-2 studies, each a frontal and a lateral view; every report has findings and impression
    (the impression spans two lines), the CSV's split column train/valid."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        patient = f"patient{p + 1:05d}"
        for order in range(1, int(rng.integers(1, 3)) + 1):
            findings = FINDINGS[int(rng.integers(0, len(FINDINGS)))]
            impression = f"1. {findings.split('.')[0]}.\n2. Otherwise unremarkable since study {p}.{order - 1}."
            for view, fl in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
                rel = f"train/{patient}/study{order}/{view}.jpg"
                out = root / image_dir / Path(rel).with_suffix(".png")
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.normal(50, 10, (48, 48)).clip(0, 255).astype(np.uint8), "L").save(out)
                rows.append(
                    {
                        "path_to_image": rel,
                        "path_to_dcm": rel.replace(".jpg", ".dcm"),
                        "frontal_lateral": fl,
                        "ap_pa": "AP" if fl == "Frontal" else None,
                        "deid_patient_id": patient,
                        "patient_report_date_order": order,
                        "report": f"FINDINGS: {findings}\nIMPRESSION: {impression}",
                        "section_findings": findings,
                        "section_impression": impression,
                        "age": int(rng.integers(20, 90)),
                        "sex": ("Male", "Female")[p % 2],
                        "split": "valid" if p == n_patients - 1 else "train",
                    }
                )
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(root / CSV, index=False)
    return root
