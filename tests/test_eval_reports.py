"""Report metrics against independent computations: BLEU-1..4 and ROUGE-L (pycocoevalcap, rouge-score,
sacrebleu), CheXpert-label F1 by hand, BERTScore and CheXbert similarity from a tiny local encoder."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from medlava.cli import main
from medlava.config import EvalConfig
from medlava.data.chexpert import OBSERVATIONS
from medlava.eval.radiology import label_scores, report_metrics
from medlava.eval.text import report_tokens
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from transformers import BertConfig, BertModel, BertTokenizerFast

SENTENCES = [
    "The heart size is normal.",
    "There is no pleural effusion or pneumothorax.",
    "Mild cardiomegaly.",
    "Left lower lobe opacity may represent atelectasis.",
    "Lungs are clear without focal consolidation.",
    "There is a small right pleural effusion, unchanged.",
    "No acute cardiopulmonary process.",
    "Mediastinal contours are stable.",
    "Right IJ catheter tip in the mid SVC.",
    "Possible pneumonia.",
]


def synthetic_pairs(n: int, seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    refs = [" ".join(rng.sample(SENTENCES, rng.randint(1, 5))) for _ in range(n)]
    hyps = [" ".join(rng.sample(SENTENCES, rng.randint(1, 5))) for _ in range(n)]
    hyps[3] = ""  # an empty report counts, with zero overlap
    return pd.DataFrame({"id": [f"s{i}" for i in range(n)], "reference": refs, "prediction": hyps})


def test_bleu_and_rouge_match_pycocoevalcap_sacrebleu_and_rouge_score():
    df = synthetic_pairs(60, 0)
    m, per, _, _ = report_metrics(df, EvalConfig())
    hyp = [report_tokens(t) for t in df["prediction"]]
    ref = [report_tokens(t) for t in df["reference"]]
    assert hyp[0].endswith(" .") and "," not in ref[5]
    coco_bleu, _ = Bleu(4).compute_score(
        {i: [r] for i, r in enumerate(ref)}, {i: [h] for i, h in enumerate(hyp)}, verbose=0
    )
    for n in range(1, 5):
        assert m[f"bleu_{n}"] == pytest.approx(coco_bleu[n - 1], abs=1e-6)
        direct = BLEU(tokenize="none", max_ngram_order=n).corpus_score(hyp, [ref]).score / 100
        assert m[f"bleu_{n}"] == pytest.approx(direct, abs=1e-9)
    coco_rouge, per_coco = Rouge().compute_score(
        {i: [r] for i, r in enumerate(ref)}, {i: [h] for i, h in enumerate(hyp)}
    )
    assert m["rouge_l_coco"] == pytest.approx(coco_rouge, abs=1e-9)
    assert per["rouge_l_coco"].to_numpy() == pytest.approx(per_coco, abs=1e-9)
    # rouge-score's own tokenizer drops "." and punctuation; on reports without them both agree.
    plain = df.assign(
        reference=df["reference"].str.replace(r"[.,]", "", regex=True),
        prediction=df["prediction"].str.replace(r"[.,]", "", regex=True),
    )
    m_plain, per_plain, _, _ = report_metrics(plain, EvalConfig())
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(plain["reference"], plain["prediction"])]
    assert per_plain["rouge_l"].to_numpy() == pytest.approx(want, abs=1e-12)
    assert m_plain["rouge_l"] == pytest.approx(np.mean(want))
    assert m["empty_predictions"] == 1 and per.loc[3, "rouge_l"] == 0 and per.loc[3, "bleu_4"] == 0


def test_rouge_l_lcs_matches_rouge_score_on_random_token_sequences():
    from medlava.eval.text import pair_scores

    rng = random.Random(5)
    words = "the heart size is normal no pleural effusion . left lower lobe opacity".split()
    hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    got = pair_scores(hyps, refs)

    class Split:  # rouge-score with the same tokens (its default tokenizer would drop ".")
        tokenize = staticmethod(str.split)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Split())
    want = [scorer.score(r, h)["rougeL"] for h, r in zip(hyps, refs)]
    assert got["rouge_l_precision"] == pytest.approx([w.precision for w in want], abs=1e-12)
    assert got["rouge_l_recall"] == pytest.approx([w.recall for w in want], abs=1e-12)
    assert got["rouge_l"] == pytest.approx([w.fmeasure for w in want], abs=1e-12)


def _labels(rows: list[dict]) -> np.ndarray:
    return np.array([[r.get(o, np.nan) for o in OBSERVATIONS] for r in rows], dtype=float)


def test_label_f1_by_hand_with_the_uncertain_flag():
    ref = _labels(
        [
            {"Cardiomegaly": 1, "Edema": 1},
            {"Cardiomegaly": 0, "Pleural Effusion": 1},
            {"No Finding": 1},
            {"Atelectasis": -1, "Fracture": 1},
        ]
    )
    pred = _labels(
        [
            {"Cardiomegaly": 1},
            {"Cardiomegaly": 1, "Pleural Effusion": -1},
            {"No Finding": 1, "Edema": 0},
            {"Atelectasis": 1},
        ]
    )
    s = label_scores(ref, pred, uncertain_as_positive=False)
    # positives: ref {C,E}, {PE}, {NF}, {F}; pred {C}, {C}, {NF}, {A}. TP = C(row0), NF(row2) = 2; FP = C(row1), A = 2;
    # FN = E, PE, F = 3.
    assert s["micro_14"] == pytest.approx({"precision": 2 / 4, "recall": 2 / 5, "f1": 2 * 2 / (4 + 5)})
    # per label F1: C 2*1/(2+1), E 0, PE 0, NF 1, F 0, A 0, others undefined -> 0; macro over 14
    assert s["macro_14"]["f1"] == pytest.approx((2 / 3 + 1) / 14)
    assert s["per_label"]["Cardiomegaly"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
        "predicted": 2,
    }
    # example-based: row F1s 2*1/(2+1), 0, 1, 0
    assert s["example_14"]["f1"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    # the 5-label set (C, E, Cons, A, PE): TP = C; FP = C(row1), A; FN = E, PE
    assert s["micro_5"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    u = label_scores(ref, pred, uncertain_as_positive=True)  # now ref A and pred PE count as positive
    assert u["micro_14"] == pytest.approx({"precision": 4 / 5, "recall": 4 / 6, "f1": 2 * 4 / (5 + 6)})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random BERT and a word-level tokenizer made here (no download), saved as a local model directory."""
    path = tmp_path_factory.mktemp("bert")
    words = sorted({w for s in SENTENCES for w in report_tokens(s).split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=1,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    ).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


@torch.no_grad()
def _embed(model, tok, text: str, layer: int) -> torch.Tensor:
    enc = tok(text, return_tensors="pt")
    return model(**enc, output_hidden_states=True).hidden_states[layer][0]


def test_bertscore_from_a_local_model_matches_greedy_matching_by_hand(tiny_bert):
    path, model, tok = tiny_bert
    df = synthetic_pairs(6, 1)
    m, per, _, _ = report_metrics(df, EvalConfig(bertscore_model=str(path), bertscore_layers=2))
    for i, (h, r) in enumerate(zip(df["prediction"], df["reference"])):
        if not h:
            assert per.loc[i, "bertscore_f1"] == 0
            continue
        eh = torch.nn.functional.normalize(_embed(model, tok, h, 2), dim=-1)
        er = torch.nn.functional.normalize(_embed(model, tok, r, 2), dim=-1)
        sim = eh @ er.T  # [CLS]/[SEP] take part in the max but carry no weight of their own
        p = sim[1:-1].max(dim=1).values.mean().item()
        rec = sim[:, 1:-1].max(dim=0).values.mean().item()
        assert per.loc[i, "bertscore_f1"] == pytest.approx(2 * p * rec / (p + rec), abs=1e-5)
    assert m["bertscore_f1"] == pytest.approx(per["bertscore_f1"].mean())
    assert m["bertscore"]["model"] == str(path) and m["bertscore"]["layers"] == 2


def test_chexbert_similarity_uses_the_checkpoint_cls_embedding(tiny_bert, tmp_path):
    path, model, tok = tiny_bert
    state = {f"module.bert.{k}": v for k, v in model.state_dict().items()}
    state.update({f"module.linear_heads.{i}.weight": torch.randn(4, 64) for i in range(14)})
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "chexbert.pth")
    df = synthetic_pairs(5, 2)
    m, per, _, _ = report_metrics(
        df, EvalConfig(chexbert_checkpoint=str(tmp_path / "chexbert.pth"), chexbert_tokenizer=str(path))
    )
    for i, (h, r) in enumerate(zip(df["prediction"], df["reference"])):
        a, b = _embed(model, tok, h, -1)[0], _embed(model, tok, r, -1)[0]
        assert per.loc[i, "chexbert_similarity"] == pytest.approx(torch.cosine_similarity(a, b, dim=0).item(), abs=1e-5)
    assert m["chexbert_similarity"] == pytest.approx(per["chexbert_similarity"].mean())
    torch.save({"model_state_dict": {"module.linear_heads.0.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no `bert.\\*` weights"):
        report_metrics(df, EvalConfig(chexbert_checkpoint=str(tmp_path / "bad.pth"), chexbert_tokenizer=str(path)))


def test_metrics_command_on_two_csvs(tmp_path, capsys):
    df = synthetic_pairs(30, 3)
    gt = pd.DataFrame({"study_id": df["id"], "report": df["reference"]})
    pred = pd.DataFrame({"study_id": df["id"], "report": df["prediction"]}).iloc[::-1]  # order does not matter
    gt.to_csv(tmp_path / "gt.csv", index=False)
    pred.to_csv(tmp_path / "pred.csv", index=False)
    out = tmp_path / "m"
    assert (
        main(["metrics", "--gt", str(tmp_path / "gt.csv"), "--pred", str(tmp_path / "pred.csv"), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    direct, _, _, _ = report_metrics(df, EvalConfig())
    for key in ("bleu_1", "bleu_4", "rouge_l", "chexpert_rules_f1_micro_14", "chexpert_rules_f1_macro_5"):
        assert m[key] == pytest.approx(direct[key]) and key in printed
    assert m["n"] == 30 and m["empty_predictions"] == 1 and m["chexpert_rules"]["uncertain_as_positive"] is False
    assert "CheXbert" in m["chexpert_rules"]["labeler"]  # named honestly: "not CheXbert"
    labels = pd.read_csv(out / "labels_prediction.csv", dtype={"study_id": str}).set_index("study_id")
    assert list(labels.columns) == list(OBSERVATIONS) and labels.loc["s3", "No Finding"] == 1
    errors = pd.read_csv(out / "errors.csv", keep_default_na=False)
    assert errors["rouge_l"].is_monotonic_increasing and errors.loc[0, "id"] == "s3"
    assert (out / "chexpert_rules_f1.png").stat().st_size > 1000
    # a study missing from one file is an error naming it and the fix
    pred.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    assert (
        main(["metrics", "--gt", str(tmp_path / "gt.csv"), "--pred", str(tmp_path / "short.csv"), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "1 only in" in err and "s0" in err and "give every study a row" in err


def test_eval_command_picks_report_metrics_from_the_task_column(tmp_path):
    df = synthetic_pairs(12, 4).assign(task="report")
    df.to_csv(tmp_path / "predictions.csv", index=False)
    assert main(["eval", "--predictions", str(tmp_path / "predictions.csv"), "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    direct, _, _, _ = report_metrics(df, EvalConfig())
    assert m["family"] == "report" and m["bleu_2"] == pytest.approx(direct["bleu_2"])
    assert pd.read_csv(tmp_path / "e" / "per_sample.csv")["id"].tolist() == df["id"].tolist()
