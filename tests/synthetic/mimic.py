"""A small MIMIC-CXR in the release's layout: the metadata / split / CheXpert tables with their real columns,
report files `files/pXX/pSUBJECT/sSTUDY.txt` in MIMIC's FINAL REPORT shape, and 8-bit grayscale images in the
MIMIC-CXR-JPG tree or seed 003's flat `images/{study_id}-{dicom_id}.png`. For tests and demos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from medlava.data.mimic_cxr import (
    CHEXPERT,
    METADATA,
    OBSERVATIONS,
    SPLIT,
    image_path,
    report_path,
)
from PIL import Image, ImageDraw

METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
_FINDINGS = {
    "Pleural Effusion": "There is a small left pleural effusion.",
    "Cardiomegaly": "The heart is moderately enlarged.",
    "Pneumothorax": "A small right apical pneumothorax is seen.",
    "Atelectasis": "Mild bibasilar atelectasis is present.",
}
_NORMAL = (
    "The lungs are clear. There is no pleural effusion or pneumothorax. The cardiomediastinal silhouette is normal."
)


def report_text(findings: str | None, impression: str) -> str:
    body = f" FINDINGS:\n \n {findings}\n \n" if findings is not None else ""
    return (
        f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___ "
        f"with cough\n \n COMPARISON:  None.\n \n{body} IMPRESSION:\n \n {impression}\n"
    )


def make_synthetic_mimic(
    root: Path, n_subjects: int = 9, seed: int = 0, layout: str = "official", size: int = 64
) -> Path:
    """Subjects 1-3 studies each, studies PA or AP plus a lateral; splits by subject 5:2:2 of each 9; every
    third study's report has no FINDINGS section (IMPRESSION only), as many real ones do."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    meta, splits, labels = [], [], []
    study_no = 50000000
    for s in range(n_subjects):
        subject = str(10000000 + 1000 * s + 32)
        split = ("train",) * 5 + ("validate",) * 2 + ("test",) * 2
        split = split[s % 9]
        for _ in range(int(rng.integers(1, 4))):
            study_no += 1 + int(rng.integers(0, 1000))
            study = str(study_no)
            finding = list(_FINDINGS)[int(rng.integers(0, len(_FINDINGS) + 1)) - 1] if rng.random() < 0.7 else None
            text = _FINDINGS[finding] if finding else _NORMAL
            impression = f"{finding}." if finding else "No acute cardiopulmonary process."
            path = root / report_path(subject, study)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report_text(None if study_no % 3 == 0 else text, impression), encoding="utf-8")
            labels.append(
                {
                    "subject_id": subject,
                    "study_id": study,
                    **dict.fromkeys(OBSERVATIONS, ""),
                    **({finding: "1.0"} if finding else {"No Finding": "1.0"}),
                }
            )
            for view in (("PA", "AP")[int(rng.integers(0, 2))], "LATERAL"):
                dicom = "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))
                meta.append(
                    {
                        "dicom_id": dicom,
                        "subject_id": subject,
                        "study_id": study,
                        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                        "ViewPosition": view,
                        "Rows": size,
                        "Columns": size,
                        "StudyDate": 21800101,
                        "StudyTime": 101010.0,
                        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                        "ViewCodeSequence_CodeMeaning": "postero-anterior" if view == "PA" else "lateral",
                        "PatientOrientationCodeSequence_CodeMeaning": "Erect",
                    }
                )
                splits.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
                im = Image.fromarray(rng.normal(40, 8, (size, size)).clip(0, 255).astype(np.uint8), "L")
                ImageDraw.Draw(im).ellipse((size // 5, size // 5, size // 2, 4 * size // 5), fill=150)
                out = root / image_path(layout, subject, study, dicom)
                out.parent.mkdir(parents=True, exist_ok=True)
                im.save(out, **({"quality": 90} if out.suffix == ".jpg" else {}))
    pd.DataFrame(meta, columns=list(METADATA_COLUMNS)).to_csv(root / METADATA, index=False)
    pd.DataFrame(splits).to_csv(root / SPLIT, index=False)
    pd.DataFrame(labels, columns=["subject_id", "study_id", *OBSERVATIONS]).to_csv(root / CHEXPERT, index=False)
    return root
