"""The llava_med_* VQA family against LLaVA-Med v1.0's own scorers: tests/reference/vqa_scorer.json holds what
run_eval_batch.evaluate and run_eval.evaluate (and normalize_word) gave on 600 generated cases
(tests/reference/regenerate.py)."""

import json

import pandas as pd
import pytest
from medlava.eval import llava_med_vqa
from medlava.eval.vqa import vqa_metrics
from reference_cases import REFERENCE, scorer_cases

REF = json.loads((REFERENCE / "vqa_scorer.json").read_text())


def test_cases_are_the_generated_ones():
    assert [(c["prediction"], c["reference"]) for c in REF["cases"]] == scorer_cases()
    # The cases reach the rules that matter: yes/no inside words, repeats, numbers, digit commas, all-empty.
    norm = [c["normalized_prediction"] for c in REF["cases"]]
    assert any("know" in p or "normal" in p for p in norm) and any("1000" in p for p in norm) and "" in norm
    assert (
        0
        < sum(c["closed_hit_run_eval"] for c in REF["cases"])
        < sum(c["closed_hit"] for c in REF["cases"])
        < len(REF["cases"])
    )  # the two closed rules differ on these cases
    assert any(0 < c["open_recall"] < 1 for c in REF["cases"])


def test_normalize_word_equals_the_original():
    for c in REF["cases"]:
        assert llava_med_vqa.normalize_word(c["prediction"].lower()) == c["normalized_prediction"], c
        assert llava_med_vqa.normalize_word(c["reference"].lower()) == c["normalized_reference"], c


def test_per_case_scores_equal_the_original():
    for c in REF["cases"]:
        f1, precision, recall = llava_med_vqa.open_scores(c["prediction"], c["reference"])
        assert (recall, precision, f1) == pytest.approx(
            (c["open_recall"], c["open_precision"], c["open_f1"]), abs=1e-12
        ), c
        assert llava_med_vqa.closed_hit(c["prediction"], c["reference"]) == bool(c["closed_hit"]), c
        assert llava_med_vqa.closed_hit_run_eval(c["prediction"], c["reference"]) == bool(c["closed_hit_run_eval"]), c


def test_metrics_json_family_equals_the_original_evaluate():
    cases = REF["cases"]
    df = pd.DataFrame(
        {
            "id": range(len(cases)),
            "task": [t.lower() for t in REF["answer_types"]],
            "prompt": "q",
            "reference": [c["reference"] for c in cases],
            "prediction": "mapped",
            "text": [c["prediction"] for c in cases],
        }
    )
    m, per = vqa_metrics(df, [], n_bootstrap=0)
    want, want_run_eval = REF["evaluate"], REF["evaluate_run_eval"]
    assert m["llava_med_closed_accuracy"] == pytest.approx(want["closed_accuracy"], abs=1e-12)
    assert m["llava_med_closed_accuracy_run_eval"] == pytest.approx(want_run_eval["closed_accuracy"], abs=1e-12)
    assert want["closed_accuracy"] != want_run_eval["closed_accuracy"]
    for key in ("open_recall", "open_precision", "open_f1"):  # the same in both scripts
        assert m[f"llava_med_{key}"] == pytest.approx(want[key], abs=1e-12) == want_run_eval[key]
    # It scores the raw text (answers.jsonl `text`), not the `prediction` mapped to a choice.
    assert per["llava_med_closed_hit"].sum() > 0


@pytest.mark.parametrize(
    ("prediction", "reference", "hit", "hit_run_eval"),
    [
        ("Normal.", "No", True, True),  # "no" inside "normal": both originals count it
        ("I don't know", "no", True, True),  # and inside "know"
        ("Yes, there is.", "yes", True, True),
        ("Left lung", "left", True, False),  # no yes/no word: never right for run_eval.py
        ("No, it is not.", "yes", False, False),
    ],
)
def test_closed_rules_by_hand(prediction, reference, hit, hit_run_eval):
    assert llava_med_vqa.closed_hit(prediction, reference) == hit
    assert llava_med_vqa.closed_hit_run_eval(prediction, reference) == hit_run_eval


def test_the_two_closed_rules_on_modality_answers_by_hand():
    # 9 closed questions; gold answers name modalities and sides. run_eval_batch.py: the gold inside the answer
    # (6 of 9); run_eval.py also wants "yes"/"no" in the answer, which 3 of those 6 lack.
    cases = [
        ("CT", "ct"),
        ("It is an X-ray.", "x-ray"),
        ("MRI", "ct"),
        ("left", "left"),
        ("Yes", "yes"),
        ("No, there is none.", "no"),
        ("normal", "no"),
        ("no idea", "ct"),
        ("Axial CT", "mri"),
    ]
    batch = [llava_med_vqa.closed_hit(p, r) for p, r in cases]
    run_eval = [llava_med_vqa.closed_hit_run_eval(p, r) for p, r in cases]
    assert batch == [True, True, False, True, True, True, True, False, False]
    assert run_eval == [False, False, False, False, True, True, True, False, False]
    df = pd.DataFrame(
        {
            "id": range(9),
            "task": "closed",
            "prompt": "q",
            "reference": [r for _, r in cases],
            "prediction": "mapped",
            "text": [p for p, _ in cases],
        }
    )
    m, _ = vqa_metrics(df, [], n_bootstrap=0)
    assert (m["llava_med_closed_accuracy"], m["llava_med_closed_accuracy_run_eval"]) == (6 / 9, 3 / 9)


def test_open_recall_counts_repeats_by_hand():
    # True positives count the answer's repeats: lung x2 + left = 3; the missed "heart" is 1 -> recall 3/4
    # (2/3 by distinct words); precision 3/3.
    f1, precision, recall = llava_med_vqa.open_scores("The lung, lung, left", "left lung heart")
    assert recall == pytest.approx(3 / 4) and precision == 1.0 and f1 == pytest.approx(6 / 7)
