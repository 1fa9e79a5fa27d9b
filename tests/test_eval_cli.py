"""`medlava eval` both ways: the scoring command (`--predictions --out`) and the stage (`--config`), on the
same closed-question predictions, with the summary table printed."""

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY
from medlava.cli import main
from sklearn.metrics import accuracy_score, balanced_accuracy_score


def predictions(path: Path) -> pd.DataFrame:
    rows = [
        ("a1", "nv", "nv", 0.7),
        ("a2", "nv", "mel", 0.4),
        ("a3", "mel", "mel", 0.2),
        ("a4", "mel", "", 0.6),
        ("a5", "bcc", "bcc", 0.1),
        ("a6", "nv", "nv", 0.9),
    ]
    df = pd.DataFrame(rows, columns=["id", "reference", "prediction", "score_nv"]).assign(task="closed")
    df["score_mel"] = (1 - df["score_nv"]) / 2
    df["score_bcc"] = 1 - df["score_nv"] - df["score_mel"]
    df.to_csv(path, index=False)
    return df


def test_scoring_command_and_stage_agree(tmp_path, capsys):
    df = predictions(tmp_path / "predictions.csv")
    assert (
        main(
            [
                "eval",
                "--predictions",
                str(tmp_path / "predictions.csv"),
                "--out",
                str(tmp_path / "cmd"),
                "--n-bootstrap",
                "50",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "cmd" / "metrics.json").read_text())
    assert m["family"] == "classification" and m["unmapped"] == 1
    assert m["accuracy"] == pytest.approx(accuracy_score(df["reference"], df["prediction"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that the unmapped "?" is never a reference
        assert m["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(df["reference"], df["prediction"].replace("", "?"))
        )
    assert "balanced_accuracy" in printed and f"{m['accuracy']:.4f}" in printed and "[" in printed

    assert (
        main(
            [
                "eval",
                "--config",
                str(TINY),
                f"output_root={tmp_path / 'runs'}",
                "run_id=e1",
                f"eval.predictions={tmp_path / 'predictions.csv'}",
                "eval.n_bootstrap=50",
            ]
        )
        == 0
    )
    run = tmp_path / "runs" / "tiny" / "eval" / "e1"
    staged = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in staged.items() if k != "source"} == {k: v for k, v in m.items() if k != "source"}
    assert json.loads((run / "COMPLETE.json").read_text())["family"] == "classification"
    assert "macro_auc" in capsys.readouterr().out


def test_scoring_command_reports_bad_input(tmp_path, capsys):
    pd.DataFrame({"id": ["1"], "prediction": ["x"]}).to_csv(tmp_path / "p.csv", index=False)
    assert main(["eval", "--predictions", str(tmp_path / "p.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "missing required column(s) ['reference']" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.csv does not exist" in capsys.readouterr().err
