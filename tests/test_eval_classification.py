"""Closed-question metrics, plots and the metrics directory, against numbers worked out by hand."""

from __future__ import annotations

import json
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from medlava.eval.classification import (
    classification_metrics,
    confusion,
    encode,
    weighted_metrics,
)
from medlava.eval.closed import evaluate_closed
from medlava.eval.plots import plot_confusion, plot_roc
from medlava.io import InputError
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

ABC = ["a", "b", "c"]
HAM = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


def small_table() -> pd.DataFrame:
    """7 rows, 3 classes, with score ties across classes (row 3's 0.2 and 0.3) to exercise AUC ties."""
    rows = [
        # id, reference, prediction, score_a, score_b, score_c
        ("r1", "a", "a", 0.7, 0.2, 0.1),
        ("r2", "a", "a", 0.6, 0.3, 0.1),
        ("r3", "a", "b", 0.2, 0.5, 0.3),
        ("r4", "b", "b", 0.2, 0.7, 0.1),
        ("r5", "b", "c", 0.1, 0.4, 0.5),
        ("r6", "c", "c", 0.1, 0.1, 0.8),
        ("r7", "c", "b", 0.2, 0.5, 0.3),
    ]
    df = pd.DataFrame(rows, columns=["id", "reference", "prediction", "score_a", "score_b", "score_c"])
    df.insert(3, "task", "closed")
    return df


def random_table(n: int, k: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    classes = [f"k{i}" for i in range(k)]
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    scores = rng.dirichlet(np.ones(k), n)
    scores[np.arange(n), y] += 0.5  # informative scores, then renormalised
    scores /= scores.sum(axis=1, keepdims=True)
    df = pd.DataFrame(
        {
            "id": np.arange(n).astype(str),
            "reference": np.array(classes)[y],
            "prediction": np.array(classes, dtype=object)[pred],
            "task": "closed",
        }
    )
    for i, c in enumerate(classes):
        df[f"score_{c}"] = scores[:, i]
    return df, classes


def test_small_table_by_hand():
    m = classification_metrics(small_table(), ABC, n_bootstrap=0)
    assert m["n"] == 7 and m["unmapped"] == 0 and m["ci95"] is None
    assert m["accuracy"] == pytest.approx(4 / 7)  # r1 r2 r4 r6 right
    # recall a=2/3, b=1/2, c=1/2
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    # precision a=2/2, b=1/3 (r3 r4 r7), c=1/2 (r5 r6); F1 a=0.8, b=0.4, c=0.5
    assert m["macro_precision"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.4 + 0.5) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.4 + 2 * 0.5) / 7)
    # AUC = P(pos score > neg score), ties half. a: pos .7 .6 .2 vs neg .2 .1 .1 .2 -> (4+4+2+0.5*2)/12
    # b: pos .7 .4 vs neg .2 .3 .5 .1 .5 -> (5+3)/10;  c: pos .8 .3 vs neg .1 .1 .3 .1 .5 -> (5+3+0.5)/10
    auc = {"a": 11 / 12, "b": 0.8, "c": 0.85}
    for c in ABC:
        assert m["per_class"][c]["auc"] == pytest.approx(auc[c])
    assert m["macro_auc"] == pytest.approx(sum(auc.values()) / 3)
    assert m["auc_excluded_classes"] == [] and "macro_auc_reason" not in m
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2, "auc": 0.8}
    )
    json.dumps(m, allow_nan=False)  # JSON-able, no NaN


def test_matches_sklearn_multiclass_paths():
    df, classes = random_table(500, 5, seed=3)
    m = classification_metrics(df, classes, n_bootstrap=0)
    scores = df[[f"score_{c}" for c in classes]].to_numpy()
    assert m["macro_auc"] == pytest.approx(roc_auc_score(df["reference"], scores, multi_class="ovr", labels=classes))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(df["reference"], df["prediction"]))
    assert m["macro_f1"] == pytest.approx(f1_score(df["reference"], df["prediction"], average="macro"))


def test_always_nv_on_ham10000_distribution():
    refs = [c for c, n in HAM.items() for _ in range(n)]
    df = pd.DataFrame({"id": range(len(refs)), "reference": refs, "prediction": "nv"})
    m = classification_metrics(df, sorted(HAM), n_bootstrap=0)
    assert m["n"] == 10015
    assert m["accuracy"] == pytest.approx(6705 / 10015) and round(m["accuracy"], 3) == 0.669
    assert m["balanced_accuracy"] == pytest.approx(1 / 7) and round(m["balanced_accuracy"], 3) == 0.143
    assert m["macro_auc"] is None and "score_" in m["macro_auc_reason"]
    assert m["per_class"]["nv"]["recall"] == 1.0 and m["per_class"]["mel"]["recall"] == 0.0


def test_unmapped_predictions_are_wrong_and_reported():
    df = small_table()
    df.loc[[0, 3, 5], "prediction"] = [np.nan, "", "melanocytic nevus"]  # three right answers lost
    m = classification_metrics(df, ABC, n_bootstrap=0)
    assert m["n"] == 7
    assert m["unmapped"] == 3 and m["unmapped_rate"] == pytest.approx(3 / 7)
    assert m["accuracy"] == pytest.approx(1 / 7)  # only r2 still right
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert m["macro_auc"] == pytest.approx((11 / 12 + 0.8 + 0.85) / 3)  # scores unchanged
    cm = confusion(df, ABC)
    assert list(cm.columns) == [*ABC, "unmapped"]
    assert cm["unmapped"].tolist() == [1, 1, 1] and cm.to_numpy().sum() == 7


def test_confusion_counts():
    cm = confusion(small_table(), ABC)
    assert list(cm.index) == ABC and list(cm.columns) == ABC  # no unmapped column when none are
    assert cm.to_numpy().tolist() == [[2, 1, 0], [0, 1, 1], [0, 1, 1]]
    assert cm.index.name == "reference" and cm.columns.name == "predicted"


def test_absent_class_excluded_from_auc_and_listed():
    df = small_table()
    df["score_d"] = 0.1
    df[["score_a", "score_b", "score_c"]] *= 0.9
    df.loc[6, "prediction"] = "d"  # r7 stays wrong, now as a false positive for d
    m = classification_metrics(df, [*ABC, "d"], n_bootstrap=50)
    assert m["auc_excluded_classes"] == ["d"]
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "auc": None}
    assert m["macro_auc"] == pytest.approx((11 / 12 + 0.8 + 0.85) / 3)  # scaling keeps each ranking
    # ISIC balanced accuracy: mean recall over classes in the references (d has none) ...
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that d is predicted but never a reference
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(df["reference"], df["prediction"]))
    # ... while macro recall, like sklearn's default, also counts d (predicted) with recall 0
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2 + 0) / 4)
    json.dumps(m, allow_nan=False)


def test_bootstrap_ci_contains_point_and_is_deterministic():
    df, classes = random_table(2000, 7, seed=0)
    start = time.perf_counter()
    m = classification_metrics(df, classes, n_bootstrap=1000, seed=7)
    assert time.perf_counter() - start < 5  # ~0.6 s here; vectorised, not 1000 sklearn calls
    for name, (lo, hi) in m["ci95"].items():
        assert lo <= m[name] <= hi, name
        assert hi - lo < 0.1, name
    assert classification_metrics(df, classes, n_bootstrap=1000, seed=7)["ci95"] == m["ci95"]
    assert classification_metrics(df, classes, n_bootstrap=1000, seed=8)["ci95"] != m["ci95"]


@pytest.mark.parametrize("table", ["random", "ties"])
def test_vectorised_resample_metrics_match_sklearn_weights(table):
    df, classes = random_table(300, 4, seed=1) if table == "random" else (pd.concat([small_table()] * 20), ABC)
    df = df.assign(id=np.arange(len(df)).astype(str)).reset_index(drop=True)
    df.loc[:9, "prediction"] = "??"  # unmapped rows take part too
    enc = encode(df, classes)
    n = len(df)
    w = np.random.default_rng(0).multinomial(n, np.full(n, 1 / n), size=3).astype(float)
    got = weighted_metrics(enc, w)
    ref, pred = df["reference"], df["prediction"]
    for b in range(3):
        present = sorted(set(ref[w[b] > 0]) | set(pred[w[b] > 0]) - {"??"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns that "??" never occurs in the references
            assert got["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(ref, pred, sample_weight=w[b]))
        assert got["accuracy"][b] == pytest.approx(np.average(ref == pred, weights=w[b]))
        assert got["macro_f1"][b] == pytest.approx(
            f1_score(ref, pred, labels=present, average="macro", sample_weight=w[b])
        )
        aucs = [roc_auc_score(ref == c, df[f"score_{c}"], sample_weight=w[b]) for c in classes]
        assert got["macro_auc"][b] == pytest.approx(np.mean(aucs))


def test_plots_close_their_figures(tmp_path):
    df = small_table()
    plot_confusion(confusion(df, ABC), tmp_path / "cm.png", normalize=False)
    plot_roc(df, ABC, tmp_path / "roc.png")
    assert plt.get_fignums() == []
    for name in ("cm.png", "roc.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
    with pytest.raises(InputError, match="score_"):
        plot_roc(df.drop(columns=["score_a", "score_b", "score_c"]), ABC, tmp_path / "none.png")


def test_evaluate_closed_writes_the_metrics_directory(tmp_path):
    df = small_table()
    df.loc[0, "prediction"] = "None"  # a literal answer, not a missing value
    open_row = {"id": "q9", "reference": "left lung", "prediction": "left", "task": "open"}
    df = pd.concat([df, pd.DataFrame([open_row])], ignore_index=True)
    src = tmp_path / "predictions.csv"
    df.to_csv(src, index=False)
    out = tmp_path / "eval"
    m = evaluate_closed(src, out, n_bootstrap=100)
    assert m["classes"] == ABC  # from the score columns
    assert m["n"] == 7 and m["unmapped"] == 1 and m["excluded_rows"] == {"open": 1}
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    per_sample = pd.read_csv(out / "per_sample.csv", keep_default_na=False)
    assert per_sample.columns.tolist() == ["id", "reference", "prediction", "correct", "unmapped", "reference_score"]
    assert per_sample["prediction"][0] == "None" and per_sample["correct"].sum() == 3
    assert per_sample["reference_score"].tolist() == pytest.approx([0.7, 0.6, 0.2, 0.7, 0.4, 0.8, 0.3])
    assert pd.read_csv(out / "confusion.csv", index_col=0).loc["a"].tolist() == [1, 1, 0, 1]
    for name in ("confusion.png", "roc.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert plt.get_fignums() == []


def test_evaluate_closed_without_scores_infers_classes_from_references(tmp_path):
    small_table().to_csv(tmp_path / "scored.csv", index=False)
    evaluate_closed(tmp_path / "scored.csv", tmp_path / "eval", n_bootstrap=0)
    assert (tmp_path / "eval" / "roc.png").exists()
    df = small_table().drop(columns=["score_a", "score_b", "score_c", "task"])
    df.to_csv(tmp_path / "p.csv", index=False)
    m = evaluate_closed(tmp_path / "p.csv", tmp_path / "eval", n_bootstrap=20)  # re-run into the same directory
    assert m["classes"] == ABC and m["macro_auc"] is None and m["ci95"]["macro_auc"] is None
    assert (tmp_path / "eval" / "confusion.png").exists() and not (tmp_path / "eval" / "roc.png").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.drop(columns=["reference"]), r"missing required column.*reference"),
        (lambda df: df.assign(reference=["a", "a", "x", "b", "b", "c", "c"]), r"id=r3 reference='x'"),
        (lambda df: df.assign(reference=["a", "a", None, "b", "b", "c", "c"]), r"id=r3"),
        (lambda df: df.drop(columns=["score_b"]), r"score columns missing.*\['b'\]"),
        (lambda df: df.assign(score_z=0.0), r"not among classes.*\['z'\]"),
        (lambda df: df.assign(score_a=df["score_a"] + 0.5), r"sum to 1.*id=r1, r2"),
        (lambda df: df.assign(score_c=[0.1, 0.1, "high", 0.1, 0.5, 0.8, 0.3]), r"finite.*id=r3"),
        (lambda df: df.assign(id=["r1", "r1", "r3", "r4", "r5", "r6", "r7"]), r"duplicate id.*r1"),
        (lambda df: df.iloc[:0], r"no rows"),
    ],
)
def test_bad_input_raises_naming_the_problem(change, message):
    with pytest.raises(InputError, match=message):
        classification_metrics(change(small_table()), ABC)


def test_bad_classes_and_files(tmp_path):
    with pytest.raises(InputError, match="at least two distinct"):
        confusion(small_table(), ["a", "a", "b"])
    with pytest.raises(InputError, match="reserved"):
        confusion(small_table(), [*ABC, "unmapped"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty.csv"):
        evaluate_closed(tmp_path / "empty.csv", tmp_path / "out")
    small_table().assign(task="open").to_csv(tmp_path / "open.csv", index=False)
    with pytest.raises(InputError, match="no rows with task"):
        evaluate_closed(tmp_path / "open.csv", tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()
