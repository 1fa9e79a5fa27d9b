"""The llava_med_* VQA family against LLaVA-Med v1.0's own scorer: tests/reference/vqa_scorer.json holds what
its run_eval.evaluate (and normalize_word) gave on 600 generated cases (tests/reference/regenerate.py)."""

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
    assert 0 < sum(c["closed_hit"] for c in REF["cases"]) < len(REF["cases"])
    assert any(0 < c["open_recall"] < 1 for c in REF["cases"])


def test_normalize_word_equals_the_original():
    for c in REF["cases"]:
        assert llava_med_vqa.normalize_word(c["prediction"].lower()) == c["normalized_prediction"], c
        assert llava_med_vqa.normalize_word(c["reference"].lower()) == c["normalized_reference"], c


def test_per_case_scores_equal_the_original():
    for c in REF["cases"]:
        f1, precision, recall = llava_med_vqa.open_scores(c["prediction"], c["reference"])
        assert (recall, precision, f1) == pytest.approx((c["open_recall"], c["open_precision"], c["open_f1"]),
                                                        abs=1e-12), c
        assert llava_med_vqa.closed_hit(c["prediction"], c["reference"]) == bool(c["closed_hit"]), c


def test_metrics_json_family_equals_the_original_evaluate():
    cases = REF["cases"]
    df = pd.DataFrame({"id": range(len(cases)), "task": [t.lower() for t in REF["answer_types"]],
                       "prompt": "q", "reference": [c["reference"] for c in cases],
                       "prediction": "mapped", "text": [c["prediction"] for c in cases]})
    m, per = vqa_metrics(df, [], n_bootstrap=0)
    want = REF["evaluate"]
    assert m["llava_med_closed_accuracy"] == pytest.approx(want["closed_accuracy"], abs=1e-12)
    assert m["llava_med_open_recall"] == pytest.approx(want["open_recall"], abs=1e-12)
    assert m["llava_med_open_precision"] == pytest.approx(want["open_precision"], abs=1e-12)
    assert m["llava_med_open_f1"] == pytest.approx(want["open_f1"], abs=1e-12)
    # It scores the raw text (answers.jsonl `text`), not the `prediction` mapped to a choice.
    assert per["llava_med_closed_hit"].sum() > 0


@pytest.mark.parametrize(("prediction", "reference", "hit"), [
    ("Normal.", "No", True),            # "no" inside "normal": the original counts it
    ("I don't know", "no", True),       # and inside "know"
    ("Yes, there is.", "yes", True),
    ("Left lung", "left", False),        # no yes/no word: never right for a closed question
    ("No, it is not.", "yes", False),
])
def test_closed_rule_by_hand(prediction, reference, hit):
    assert llava_med_vqa.closed_hit(prediction, reference) == hit


def test_open_recall_counts_repeats_by_hand():
    # True positives count the answer's repeats: lung x2 + left = 3; the missed "heart" is 1 -> recall 3/4
    # (2/3 by distinct words); precision 3/3.
    f1, precision, recall = llava_med_vqa.open_scores("The lung, lung, left", "left lung heart")
    assert recall == pytest.approx(3 / 4) and precision == 1.0 and f1 == pytest.approx(6 / 7)
