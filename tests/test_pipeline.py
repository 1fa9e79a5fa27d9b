"""The whole chain through the launcher's local executor, on the tiny preset and a small synthetic
HAM10000: what `make demo` does, smaller."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, TINY
from medlava.data.samples import read_samples
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "MEDLAVA_CACHE": str(tmp / "cache")}
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "submit.py"),
        "demo",
        "--config",
        str(TINY),
        "--executor",
        "local",
        "--output-root",
        str(tmp / "runs"),
        "run_id=t1",
        f"data.root={tmp / 'ham'}",
        "data.synthetic.n_lesions=60",
        "align.epochs=1",
        "sft.epochs=3",
        "eval.n_bootstrap=50",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "runs" / "tiny", out.stdout


def test_demo_prints_where_outputs_are(demo):
    runs, stdout = demo
    for stage in ("prepare", "align", "sft", "infer", "eval"):
        assert str(runs / stage / "t1") in stdout
        assert (runs / stage / "t1" / "COMPLETE.json").exists()
        assert (runs / stage / "t1" / "config.yaml").exists()


def test_sft_logs_falling_loss_and_the_required_scalars(demo):
    runs, _ = demo
    sft = runs / "sft" / "t1"
    loss = scalars(sft, "train/loss")
    assert len(loss) >= 5 and loss[-1] < loss[0]
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s", "train/data_wait_fraction"):
        assert len(scalars(sft, tag)) == len(loss)
    assert all(v > 0 for v in scalars(sft, "train/tokens_per_s") + scalars(sft, "train/samples_per_s"))
    assert all(0 <= v < 1 for v in scalars(sft, "train/data_wait_fraction"))
    assert scalars(runs / "align" / "t1", "train/loss")  # align logs too


def test_sft_trains_lora_and_projector_only(demo):
    runs, _ = demo
    info = json.loads((runs / "sft" / "t1" / "train_info.json").read_text())
    p = info["parameters"]
    assert 0 < p["trainable"] < p["frozen"] and info["attention"] == "sdpa"
    ckpt = runs / "sft" / "t1" / json.loads((runs / "sft" / "t1" / "COMPLETE.json").read_text())["checkpoint"]
    assert (ckpt / "adapter_config.json").exists() and json.loads((ckpt / "medlava.json").read_text())["kind"] == "lora"
    assert info["init_from"] and "align" in info["init_from"]


def test_predictions_cover_each_test_sample_exactly_once(demo):
    runs, _ = demo
    test_ids = [s["id"] for s in read_samples(runs / "prepare" / "t1" / "test.jsonl")]
    pred = pd.read_csv(runs / "infer" / "t1" / "predictions.csv", keep_default_na=False)
    assert sorted(pred["id"]) == sorted(test_ids) and pred["id"].is_unique
    score_cols = [c for c in pred.columns if c.startswith("score_")]
    assert len(score_cols) == 7
    assert (pred[score_cols].sum(axis=1) - 1).abs().max() < 1e-5
    chunks = sorted((runs / "infer" / "t1" / "chunks").glob("answers-*.jsonl"))
    assert len(chunks) == 2
    answers = [json.loads(line) for line in (runs / "infer" / "t1" / "answers.jsonl").read_text().splitlines()]
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(answers[0])


def test_metrics_hold_accuracy_f1_auc_and_confusion(demo):
    runs, _ = demo
    ev = runs / "eval" / "t1"
    m = json.loads((ev / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "macro_auc", "balanced_accuracy"):
        assert m[key] is not None and 0 <= m[key] <= 1
    cm = pd.read_csv(ev / "confusion.csv", index_col=0)
    assert cm.values.sum() == m["n"]
    assert (ev / "confusion.png").stat().st_size > 1000


def test_relaunching_a_finished_run_is_refused_before_anything_is_written(demo):
    """Its config.yaml, COMPLETE.json (whose time `latest` goes by), launch record and log stay as they are: the
    local and slurm executors refuse it before writing or queueing anything, a slurm dry run warns of it."""
    runs, _ = demo
    tmp, sft = runs.parent.parent, runs / "sft" / "t1"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sft.rglob("*") if p.is_file()}
    assert {"logs/local.json", "logs/sft.log", "config.yaml"} <= {str(p.relative_to(sft)) for p in before}
    taken = f"{sft} already holds a complete sft run (started "
    slurm = ["--executor", "slurm", "--cpus-per-task", "1"]
    for executor in (["--executor", "local"], slurm, [*slurm, "--dry-run"]):
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch" / "submit.py"),
                "sft",
                "--config",
                str(TINY),
                *executor,
                "--output-root",
                str(tmp / "runs"),
                "run_id=t1",
                f"data.root={tmp / 'ham'}",
                "data.synthetic.n_lesions=60",
                "sft.epochs=3",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "MEDLAVA_CACHE": str(tmp / "cache")},
            cwd=tmp,
        )
        assert "a finished run is never rewritten: choose another run_id" in out.stderr, out.stderr
        if "--dry-run" in executor:
            assert out.returncode == 0 and "#SBATCH" in out.stdout
            assert f"submit: warning (submitting would refuse this): {taken}" in out.stderr
        else:
            assert out.returncode == 2 and out.stdout == "", out.stdout[-2000:]
            assert f"submit: refused: {taken}" in out.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sft.rglob("*") if p.is_file()} == before
