"""The rule-based CheXpert labeler on hand-written reports, and `medlava label-reports`."""

import pandas as pd
import pytest
from medlava.cli import main
from medlava.data.chexpert import OBSERVATIONS, label_report

# (report, the labels it must get; every observation not listed must be blank)
CASES = [
    ("No pneumothorax.", {"No Finding": 1, "Pneumothorax": 0}),
    ("Left lower lobe opacity may represent atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    (
        "Heart size is normal. No focal consolidation, pleural effusion, or pneumothorax.",
        {"No Finding": 1, "Cardiomegaly": 0, "Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0},
    ),
    (
        "Moderate cardiomegaly. Small bilateral pleural effusions. Mild pulmonary edema. Right rib fracture.",
        {"Cardiomegaly": 1, "Pleural Effusion": 1, "Edema": 1, "Fracture": 1},
    ),
    ("There is no pneumothorax but there is a small left effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("Cannot exclude early pneumonia.", {"Pneumonia": -1}),
    ("No new consolidation.", {"Consolidation": -1}),  # "no new" implies an old one: uncertain, as CheXpert
    ("Possible right lower lobe pneumonia versus atelectasis.", {"Pneumonia": -1, "Atelectasis": -1}),
    ("The cardiomediastinal silhouette is stable.", {"Enlarged Cardiomediastinum": -1}),
    (
        "Mediastinal and hilar contours are unremarkable. Lungs are clear.",
        {"No Finding": 1, "Enlarged Cardiomediastinum": 0},
    ),
    ("The heart is normal in size.", {"No Finding": 1, "Cardiomegaly": 0}),
    ("Heart size is top normal.", {"Cardiomegaly": -1}),
    ("Pulmonary vascular congestion without frank edema.", {"Edema": -1}),  # negative + uncertain -> uncertain
    ("Small right effusion. No left effusion.", {"Pleural Effusion": 1}),  # positive + negative -> positive
    ("Findings suggest CHF.", {"Edema": -1, "Cardiomegaly": -1}),  # heart failure also makes Cardiomegaly uncertain
    (
        "Endotracheal tube 4 cm above the carina. Right PICC line ends in the SVC. No acute cardiopulmonary process.",
        {"No Finding": 1, "Support Devices": 1},
    ),  # devices do not stop No Finding
    ("Small pericardial effusion.", {"No Finding": 1}),  # not a pleural effusion
    ("No change in the small left pleural effusion.", {"Pleural Effusion": 1}),
    (
        "Bibasilar opacities, likely atelectasis, although infection is not excluded.",
        {"Lung Opacity": 1, "Atelectasis": 1, "Pneumonia": -1},
    ),
    ("", {"No Finding": 1}),  # nothing positive or uncertain: CheXpert's No Finding rule
]


@pytest.mark.parametrize(("report", "want"), CASES, ids=[c[0][:40] or "empty" for c in CASES])
def test_hand_written_reports(report, want):
    got = dict(zip(OBSERVATIONS, label_report(report)))
    assert got == {o: want.get(o) for o in OBSERVATIONS}


def test_label_reports_command_writes_chexpert_columns(tmp_path):
    reports = pd.DataFrame(
        {
            "study_id": ["s1", "s2", "s3"],
            "report": ["No pneumothorax.", "", "Left lower lobe opacity may represent atelectasis."],
        }
    )
    reports.to_csv(tmp_path / "reports.csv", index=False)
    assert (
        main(["label-reports", "--reports", str(tmp_path / "reports.csv"), "--out", str(tmp_path / "labels.csv")]) == 0
    )
    text = (tmp_path / "labels.csv").read_text().splitlines()
    assert text[0] == "study_id," + ",".join(OBSERVATIONS)
    assert text[1] == "s1,1" + "," * 9 + "0" + "," * 4  # No Finding 1, Pneumothorax 0, the rest empty
    labels = pd.read_csv(tmp_path / "labels.csv", dtype={"study_id": str})
    assert labels.loc[2, "Atelectasis"] == -1 and labels.loc[2, "Lung Opacity"] == 1
    assert labels.loc[1, "No Finding"] == 1 and labels.iloc[1, 2:].isna().all()


def test_label_reports_refuses_bad_input(tmp_path, capsys):
    pd.DataFrame({"id": ["a"], "text": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["label-reports", "--reports", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "missing column(s) ['study_id', 'report']" in capsys.readouterr().err
    pd.DataFrame({"study_id": ["a", "a"], "report": ["x", "y"]}).to_csv(tmp_path / "dup.csv", index=False)
    assert main(["label-reports", "--reports", str(tmp_path / "dup.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "dup.csv:3: study_id 'a' appears twice" in capsys.readouterr().err
