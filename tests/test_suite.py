"""`python launch/submit.py suite --config jobs/configs/tiny_suite.yaml --executor local`, run once for the module: the
seven benchmarks written in their release layouts, prepared (cached), answered by two array tasks, merged exactly
once, each scored by its published protocol, one leaderboard; TensorBoard of infer and eval; two runs compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from medlava.cli import main as medlava
from medlava.data.samples import read_samples
from medlava.infer.answer import mapped_answer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CONFIG = ROOT / "jobs" / "configs" / "tiny_suite.yaml"
BENCHMARKS = ["vqa_rad", "slake", "path_vqa", "pmc_vqa", "omnimedvqa", "medxpertqa", "mmmu_med"]
ROWS = {
    ("vqa_rad", "closed"): 4,
    ("vqa_rad", "open"): 2,
    ("slake", "closed"): 9,
    ("slake", "open"): 6,
    ("path_vqa", "closed"): 4,
    ("path_vqa", "open"): 2,
    ("pmc_vqa", "all"): 8,
    ("omnimedvqa", "all"): 8,
    ("medxpertqa", "all"): 6,
    ("mmmu_med", "all"): 12,
    ("mmmu_med", "Clinical_Medicine"): 6,
    ("mmmu_med", "Pharmacy"): 6,
}
METRIC = {"closed": "llava_med_closed_accuracy", "open": "llava_med_open_recall", "all": "mc_accuracy"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("suite")
    common = [f"output_root={tmp / 'runs'}", f"data.root={tmp / 'data'}"]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "suite",
            "--config",
            str(CONFIG),
            "--executor",
            "local",
            "run_id=s1",
            *common,
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return tmp / "runs" / "tiny-suite" / "suite" / "s1", common


def test_leaderboard_has_every_protocol_row_with_intervals_and_published_scores(suite):
    run, _ = suite
    lb = pd.read_csv(run / "leaderboard.csv")
    assert {(b, r): n for b, r, n in zip(lb["benchmark"], lb["row"], lb["n"])} == ROWS
    for r in lb.itertuples():
        metrics = json.loads((run / r.benchmark / "eval" / "metrics.json").read_text())
        metric = "mmmu_accuracy" if r.benchmark == "mmmu_med" else METRIC[r.row]
        want = metrics[metric] if r.row in METRIC else metrics["by_group"]["subject"][r.row][metric]
        assert r.metric == metric and r.score == pytest.approx(round(100 * want, 2))
        assert r.ci_low <= r.score <= r.ci_high
    by = lb.set_index(["benchmark", "row"])
    assert by.loc[("slake", "closed"), "LLaVA-Med (from LLaVA), fine-tuned"] == 85.34
    assert by.loc[("medxpertqa", "all"), "Lingshu-7B"] == 26.7
    text = (run / "leaderboard.md").read_text()
    assert "arXiv:2306.00890" in text and "arXiv:2506.07044" in text and (run / "leaderboard.png").stat().st_size
    done = json.loads((run / "COMPLETE.json").read_text())
    assert done["checkpoint"] == "base" and done["benchmarks"] == BENCHMARKS
    # three jobs: the prepare job, the array of infer.chunks answering tasks, the merge
    launched = {
        e["name"]: [t["command"] for t in e["tasks"]] for e in json.loads((run / "logs" / "local.json").read_text())
    }
    assert sorted(launched) == ["suite-chunks", "suite-merge", "suite-prepare"]
    assert launched["suite-prepare"][0].endswith("--prepare-only") and launched["suite-merge"][0].endswith(
        "--merge-only"
    )
    assert [c.split()[-2:] for c in launched["suite-chunks"]] == [["--chunk-idx", "0"], ["--chunk-idx", "1"]]


def test_every_question_answered_once_multiple_choice_by_letter_likelihood(suite):
    run, _ = suite
    for bench in BENCHMARKS:
        pred = pd.read_csv(run / bench / "predictions.csv", keep_default_na=False, dtype=str)
        source = json.loads((run / bench / "chunks" / "source.json").read_text())
        split = source["infer.split"]
        ids = [s["id"] for s in read_samples(Path(source["data.samples"]) / f"{split}.jsonl")]
        assert sorted(pred["id"]) == sorted(ids) and pred["id"].is_unique
        assert sorted((run / bench / "chunks").glob("answers-*.jsonl")) == [
            run / bench / "chunks" / f"answers-{i:04d}-of-0002.jsonl" for i in range(2)
        ]
    pmc = pd.read_csv(run / "pmc_vqa" / "predictions.csv", keep_default_na=False)
    scores = pmc[[f"score_{k}" for k in "ABCD"]]
    assert (scores.sum(axis=1) - 1).abs().max() < 1e-5  # a softmax over the four letters' likelihoods
    assert (pmc["prediction"] == scores.idxmax(axis=1).str[-1]).all()


def test_prepare_is_cached(suite, tmp_path):
    run, common = suite
    prepares = sorted((run.parents[1] / "prepare").iterdir())
    assert [p.name.split("-")[1] for p in prepares] == sorted(BENCHMARKS)
    before = {p: (p / "COMPLETE.json").stat().st_mtime for p in prepares}
    assert medlava(["suite", "--config", str(CONFIG), "--prepare-only", "run_id=s2", *common]) == 0
    assert {p: (p / "COMPLETE.json").stat().st_mtime for p in prepares} == before  # found, not redone


def test_tensorboard_of_the_answers_and_of_each_eval(suite):
    run, _ = suite
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "infer/pmc_vqa/answers_per_s",
        "infer/pmc_vqa/share_scored",
        "infer/slake/share_free_text",
        "suite/mmmu_med/Pharmacy",
    } <= tags
    assert acc.Scalars("infer/pmc_vqa/share_scored")[0].value == 1.0  # every multiple-choice answer by likelihood
    assert {e.step for e in acc.Scalars("infer/pmc_vqa/answers_per_s")} == {0, 1}  # one point per chunk task
    ev = EventAccumulator(str(run / "slake" / "eval" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    assert "eval_content_type/Organ/llava_med_closed_accuracy" in ev.Tags()["scalars"]
    assert "eval/worst_samples" in ev.Tags()["images"]


def test_compare_lines_up_two_suite_runs(suite, tmp_path, capsys):
    run, _ = suite
    assert medlava(["compare", f"zero-shot={run}", f"again={run}", "--out", str(tmp_path / "cmp")]) == 0
    df = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert len(df) == len(ROWS) and (df["again - zero-shot"] == 0).all()
    assert (
        tmp_path / "cmp" / "comparison.png"
    ).exists() and "| PMC-VQA | all | mc_accuracy |" in capsys.readouterr().out


def test_generated_answers_are_read_as_letters_or_left_unmapped():
    meta = {"task": "multiple_choice", "choices": ["A", "B", "C"], "options": {"A": "Lung", "B": "Liver", "C": "Heart"}}
    assert mapped_answer("The answer is (B).", meta) == {"prediction": "B", "normalized": "letter"}
    assert mapped_answer("I am not sure about this one.", meta) == {"prediction": "", "normalized": "unmapped"}
    assert mapped_answer("Yes, there is.", {"task": "closed", "choices": ["yes", "no"]})["prediction"] == "yes"


@pytest.mark.parametrize("bench", ["pmc_vqa", "vqa_rad"])
def test_sft_trains_on_a_benchmarks_train_split(suite, bench):
    run, common = suite
    prepared = next((run.parents[1] / "prepare").glob(f"suite-{bench}-*"))
    assert (
        medlava(
            [
                "sft",
                "--config",
                str(CONFIG),
                f"data.samples={prepared}",
                f"run_id=ft-{bench}",
                "sft.max_steps=2",
                "sft.batch_size=4",
                "sft.lora={r: 4, alpha: 8}",
                *common,
            ]
        )
        == 0
    )
    sft = run.parents[1] / "sft" / f"ft-{bench}"
    done = json.loads((sft / "COMPLETE.json").read_text())
    assert done["checkpoint"] == "checkpoints/step-000002"
    acc = EventAccumulator(str(sft / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2] and all(e.value > 0 for e in acc.Scalars("train/loss"))
