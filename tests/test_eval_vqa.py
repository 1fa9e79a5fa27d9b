"""VQA metrics (SLAKE / VQA-RAD style) on hand-made tables, numbers worked out by hand or by sacrebleu and
pycocoevalcap; candidate routing; the eval dispatcher and its inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from medlava.config import EvalConfig
from medlava.eval.run import eval_inputs, evaluate, family_of, summary_table
from medlava.eval.vqa import (
    error_rank,
    load_closed_vocab,
    question_options,
    route_closed,
    vqa_metrics,
)
from medlava.io import InputError
from pycocoevalcap.bleu.bleu import Bleu
from sacrebleu.metrics import BLEU

VOCAB = ("liver", "spleen", "left lung", "right lung", "ct", "mri", "t2")


@pytest.mark.parametrize(
    ("question", "options"),
    [
        ("Which is bigger in this image, the liver or the spleen?", ["liver", "spleen"]),
        ("Is this the left lung or the right lung?", ["left lung", "right lung"]),
        ("Is this an MRI or a CT scan?", ["mri", "ct scan"]),
        ("What modality is used?", []),
        ("Does the picture contain liver?", []),
    ],
)
def test_question_options(question, options):
    assert question_options(question) == options


@pytest.mark.parametrize(
    ("question", "prediction", "reference", "want"),
    [
        ("Is there a pleural effusion?", "Yes, a small one.", "Yes", ("yes", "yes_no")),
        ("Is the lung healthy?", "There is no abnormality", "No", ("no", "yes_no")),
        ("Is the lung healthy?", "The lung looks abnormal", "No", (None, "yes_no")),  # unparsed: wrong, counted
        ("Which is bigger, the liver or the spleen?", "The spleen is bigger.", "Spleen", ("spleen", "options")),
        ("Which is bigger, the liver or the spleen?", "Not the liver, the spleen", "spleen", ("spleen", "options")),
        ("Which organ is abnormal?", "It is the right lung.", "Right Lung", ("right lung", "vocab")),
        ("Which organ is abnormal?", "It is the liver.", "Right Lung", ("liver", "vocab")),
        ("Which organ is abnormal?", "kidney", "Right Lung", (None, "vocab")),
    ],
)
def test_route_closed(question, prediction, reference, want):
    assert route_closed(question, prediction, reference, VOCAB) == want


def test_route_closed_without_a_vocabulary_compares_normalised_text():
    assert route_closed("Which organ?", "The Liver.", "liver", ()) == ("liver", "exact")


def table() -> pd.DataFrame:
    rows = [
        # id, task, prompt, reference, prediction, answer_type, modality
        ("c1", "closed", "Is there a nodule?", "Yes", "yes", "CLOSED", "CT"),
        ("c2", "closed", "Is the heart normal?", "No", "normal", "CLOSED", "X-Ray"),  # substring finds "no"
        ("c3", "closed", "Which is bigger, the liver or the spleen?", "Liver", "The liver", "CLOSED", "CT"),
        ("c4", "closed", "Which organ is abnormal?", "right lung", "left lung", "CLOSED", "X-Ray"),
        ("o1", "open", "What organ is shown?", "left lung", "the left lung", "OPEN", "CT"),
        ("o2", "open", "Where is the lesion?", "right upper lobe", "upper lobe of the lung", "OPEN", "X-Ray"),
        ("o3", "open", "What modality?", "MRI", "CT", "OPEN", "MRI"),
    ]
    df = pd.DataFrame(
        rows, columns=["id", "task", "prompt", "reference", "prediction", "meta_answer_type", "meta_modality"]
    )
    return df.assign(text=df["prediction"])


def test_vqa_metrics_by_hand():
    m, per = vqa_metrics(table(), list(VOCAB), n_bootstrap=200)
    # closed: c1 right (yes/no), c2 unparsed (wrong), c3 right (options), c4 wrong (vocab)
    assert m["n_closed"] == 4 and m["closed_accuracy"] == 0.5 and m["closed_unparsed"] == 1
    assert m["closed_routes"] == {"yes_no": 2, "options": 1, "vocab": 1, "exact": 0}
    assert m["closed_yes_no_accuracy"] == 0.5
    assert m["closed_substring_accuracy"] == 0.75  # a substring score counts "normal" as containing "no"
    # LLaVA-Med v1.0's run_eval_batch.py: the reference inside the answer: c1, c2 ("no" in "normal") and c3 ("liver"
    # in "the liver") right, c4 wrong; run_eval.py also wants a yes/no word, which c3 lacks
    assert m["llava_med_closed_accuracy"] == 0.75 and m["llava_med_closed_accuracy_run_eval"] == 0.5
    assert m["llava_med_open_recall"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["closed_exact_accuracy"] == 0.5  # c1, c3 ("the liver" -> "liver" after article removal)
    # open: o1 exact; recall o1 2/2, o2 2/3 (upper, lobe), o3 0; F1 o2: P 2/4 (upper lobe of lung), R 2/3
    assert m["open_exact_match"] == pytest.approx(1 / 3)
    assert m["open_token_recall"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["open_token_f1"] == pytest.approx((1 + 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3) + 0) / 3)
    hyps, refs = ["left lung", "upper lobe of lung", "ct"], ["left lung", "right upper lobe", "mri"]
    sentence = [
        BLEU(tokenize="none", effective_order=True).sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)
    ]
    assert m["open_bleu"] == pytest.approx(np.mean(sentence))
    coco, _ = Bleu(1).compute_score(
        {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}, verbose=0
    )
    assert m["open_bleu_1"] == pytest.approx(coco[0], abs=1e-9)
    assert m["by_group"]["modality"]["CT"] == {
        "n": 3,
        "n_closed": 2,
        "n_open": 1,
        "n_multiple_choice": 0,
        "closed_accuracy": 1.0,
        "closed_unparsed": 0,
        "llava_med_closed_accuracy": 1.0,
        "open_exact_match": 1.0,
        "open_token_recall": 1.0,
        "open_token_f1": 1.0,
        "llava_med_open_recall": 1.0,
    }
    assert m["by_group"]["answer_type"]["OPEN"]["n_open"] == 3
    lo, hi = m["ci95"]["closed_accuracy"]
    assert lo <= 0.5 <= hi and m["ci95"]["open_token_recall"][0] <= m["open_token_recall"]
    assert per.set_index("id").loc["c2", "route"] == "yes_no" and pd.isna(per.set_index("id").loc["c2", "mapped"])
    json.dumps(m, allow_nan=False)


def test_evaluate_writes_vqa_directory_with_error_dump(tmp_path):
    df = table()
    df.to_csv(tmp_path / "predictions.csv", index=False)
    m = evaluate(
        tmp_path / "predictions.csv", tmp_path / "ev", EvalConfig(n_bootstrap=0, error_dump=3), vocab=list(VOCAB)
    )
    assert m["family"] == "vqa" and json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 7
    errors = pd.read_csv(tmp_path / "ev" / "errors.csv", keep_default_na=False)
    # worst first: the unparsed closed answer, the wrong closed one, then the open answer with the lowest F1
    assert errors["id"].tolist() == ["c2", "c4", "o3"]
    assert errors.loc[0, "prompt"] == "Is the heart normal?" and errors.loc[0, "text"] == "normal"
    assert json.loads((tmp_path / "ev" / "closed_vocab.json").read_text()) == list(VOCAB)
    assert (tmp_path / "ev" / "vqa_groups.png").stat().st_size > 1000
    table_text = summary_table(m)
    assert "closed_accuracy" in table_text and "0.5000" in table_text and "open_token_recall" in table_text


def test_vocabulary_from_samples_and_eval_inputs(tmp_path):
    prepared, infer = tmp_path / "prepare", tmp_path / "infer"
    prepared.mkdir()
    infer.mkdir()
    rows = [
        {"id": "1", "conversations": [], "meta": {"task": "closed", "answer": "Left Lung", "choices": ["a", "b"]}},
        {"id": "2", "conversations": [], "meta": {"task": "closed", "answer": "Yes"}},
        {"id": "3", "conversations": [], "meta": {"task": "open", "answer": "heart"}},
    ]
    (prepared / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (infer / "predictions.csv").write_text("id,prediction,reference,task\n")
    (infer / "COMPLETE.json").write_text(json.dumps({"samples": str(prepared), "classes": None}))
    inputs = eval_inputs(infer, EvalConfig())
    assert inputs.vocab == ["left lung"] and inputs.vocab_source == str(prepared / "train.jsonl")
    (tmp_path / "v.json").write_text(json.dumps(["Spleen", "no", "The Liver"]))
    assert eval_inputs(infer, EvalConfig(closed_vocab=str(tmp_path / "v.json"))).vocab == ["liver", "spleen"]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(InputError, match="holds a list"):
        load_closed_vocab(tmp_path / "bad.json")


def test_family_of_tasks(tmp_path):
    assert family_of(["closed", "label"], tmp_path) == "classification"
    assert family_of(["closed", "open"], tmp_path) == "vqa"
    assert family_of(["report"], tmp_path) == "report"
    with pytest.raises(InputError, match="mixed with"):
        family_of(["report", "closed"], tmp_path)
    with pytest.raises(InputError, match="cannot tell"):
        family_of(["caption"], tmp_path)


def test_multiple_choice_and_mmmu_rows_by_hand():
    # m1 right by likelihood; m2 wrong; m3 generated and unparsed: wrong and counted, never guessed. MMMU: q1 a letter
    # question answered right, q2 an open one answered "so it is 2.0" (MMMU's eval_open: 2.0 == 2), q3 open, wrong.
    rows = [
        ("m1", "multiple_choice", "B", "B", "B", "pmc_vqa", ""),
        ("m2", "multiple_choice", "A", "C", "C", "pmc_vqa", ""),
        ("m3", "multiple_choice", "", "D", "I cannot tell", "pmc_vqa", ""),
        ("q1", "multiple_choice", "A", "A", "(A)", "mmmu_med", "Pharmacy"),
        ("q2", "open", "so it is 2.0", "2", "so it is 2.0", "mmmu_med", "Pharmacy"),
        ("q3", "open", "three", "['4', '4.0']", "three", "mmmu_med", "Clinical_Medicine"),
    ]
    df = pd.DataFrame(rows, columns=["id", "task", "prediction", "reference", "text", "meta_dataset", "meta_subject"])
    m, per = vqa_metrics(df.assign(prompt="q"), [], n_bootstrap=100)
    assert m["n_multiple_choice"] == 4 and m["mc_accuracy"] == 0.5 and m["mc_unparsed"] == 1
    assert m["mc_unparsed_rate"] == 0.25 and m["mmmu_accuracy"] == pytest.approx(2 / 3)
    assert per.set_index("id")["mmmu_correct"].to_dict() == {
        "m1": None,
        "m2": None,
        "m3": None,
        "q1": True,
        "q2": True,
        "q3": False,
    }
    lo, hi = m["ci95"]["mc_accuracy"]
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert m["by_group"]["subject"]["Pharmacy"]["mmmu_accuracy"] == 1.0
    assert m["by_group"]["subject"]["Clinical_Medicine"]["mmmu_accuracy"] == 0.0
    assert list(per.assign(r=error_rank(per)).sort_values("r")["id"])[:3] == ["m3", "m2", "q3"]
