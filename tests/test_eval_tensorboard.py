"""`eval` writes TensorBoard: metrics as scalars at the evaluated checkpoint's step (also into the trained run, so
several checkpoints draw a curve), per-group accuracy, the figures and a worst-first preview grid as images, the worst
samples as text, option probabilities as histograms; read back with TensorBoard's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY
from medlava.config import load_config
from medlava.eval.tensorboard import option_probabilities, worst_first
from medlava.io import atomic_write_json
from medlava.predictions import write_predictions
from medlava.stages.eval import run as run_eval
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SIZE = {"images": 0, "scalars": 0, "histograms": 0, "tensors": 0}


def _infer_run(tmp: Path, step: int) -> Path:
    """An infer run's outputs as infer leaves them: SLAKE-like closed and open rows with option scores and images,
    answered by checkpoint step-`step` of an sft run."""
    images = tmp / "imgs"
    rows = []
    for i in range(8):
        name = f"xmlab{i}/source.jpg"
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 24, 3), 30 * i, np.uint8)).save(images / name)
        closed = i < 6
        ref = ("yes", "no")[i % 2] if closed else "liver"
        p_yes = 0.9 if i in (0, 3) else 0.2
        pred = ("yes" if p_yes > 0.5 else "no") if closed else ("liver" if i == 6 else "lung")
        rows.append(
            {
                "id": str(i),
                "prediction": pred,
                "reference": ref,
                "task": "closed" if closed else "open",
                "prompt": f"Question {i}?",
                "text": pred,
                "image": name,
                "score_yes": p_yes if closed else None,
                "score_no": 1 - p_yes if closed else None,
                "meta_modality": ("CT", "MRI")[i % 2],
                "meta_content_type": "Organ",
                "meta_dataset": "slake",
            }
        )
    infer = tmp / "runs" / "t" / "infer" / f"s{step}"
    infer.mkdir(parents=True)
    write_predictions(infer / "predictions.csv", pd.DataFrame(rows))
    ckpt = tmp / "runs" / "t" / "sft" / "r1" / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        infer / "COMPLETE.json",
        {
            "predictions": "predictions.csv",
            "checkpoint": str(ckpt),
            "step": step,
            "image_root": str(images),
            "split": "test",
        },
    )
    return infer


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaltb")
    runs = []
    for step in (100, 200):
        cfg = load_config(
            TINY,
            [
                f"output_root={tmp / 'runs'}",
                "name=t",
                f"run_id=e{step}",
                "eval.n_bootstrap=50",
                f"eval.predictions={_infer_run(tmp, step)}",
            ],
        )
        runs.append(run_eval(cfg))
    return tmp, runs


def _events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance=SIZE)
    acc.Reload()
    return acc


def test_eval_events_hold_scalars_images_text_and_histograms(evaluated):
    tmp, (run, _) = evaluated
    acc = _events(run / "tensorboard")
    tags = acc.Tags()
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("closed_accuracy", "llava_med_closed_accuracy", "open_token_recall", "llava_med_open_recall"):
        (event,) = acc.Scalars(f"eval/{name}")
        assert event.step == 100 and event.value == pytest.approx(metrics[name])
    # per SLAKE content type and modality
    assert acc.Scalars("eval_modality/CT/closed_accuracy")[0].value == pytest.approx(
        metrics["by_group"]["modality"]["CT"]["closed_accuracy"]
    )
    assert "eval_content_type/Organ/llava_med_closed_accuracy" in tags["scalars"]
    assert {"eval/vqa_groups", "eval/worst_samples"} <= set(tags["images"])
    grid = acc.Images("eval/worst_samples")[0]
    assert grid.step == 100 and grid.width > 400 and grid.height > 300
    text = acc.Tensors("eval/worst_samples/text_summary")[0].tensor_proto.string_val[0].decode()
    lines = [x for x in text.splitlines() if x.startswith("| ") and not x.startswith("| id")]
    # wrong closed answers first (2, 3, 4), then the open answer with token F1 0 (7)
    assert [x.split(" | ")[0][2:] for x in lines[:4]] == ["2", "3", "4", "7"]
    hist = acc.Histograms("eval/p_reference")[0]
    assert hist.step == 100 and hist.histogram_value.num == 6  # the six closed rows with option scores
    done = json.loads((run / "COMPLETE.json").read_text())
    assert done["step"] == 100 and done["tensorboard"]["histograms"] == 2


def test_eval_scalars_draw_a_curve_in_the_trained_run(evaluated):
    tmp, runs = evaluated
    curve = tmp / "runs" / "t" / "sft" / "r1" / "tensorboard" / "eval-test"
    acc = _events(curve)
    assert [e.step for e in acc.Scalars("eval/closed_accuracy")] == [100, 200]


def test_option_probabilities_and_worst_first_by_hand():
    df = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "reference": ["yes", "no", "x"],
            "score_yes": [0.8, 0.3, None],
            "score_no": [0.2, 0.7, None],
        }
    )
    p = option_probabilities(df)
    assert p["eval/p_reference"].tolist() == [0.8, 0.7] and p["eval/p_predicted"].tolist() == [0.8, 0.7]
    per = pd.DataFrame({"id": ["a", "b", "c"], "correct": [True, False, False], "reference_score": [0.9, 0.4, 0.1]})
    assert worst_first(per)["id"].tolist() == ["c", "b", "a"]


def test_classification_eval_has_confusion_and_roc_images(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["mel", "nv", "bkl"]
    probs = rng.dirichlet(np.ones(3), 30)
    df = pd.DataFrame(
        {
            "id": [str(i) for i in range(30)],
            "prediction": [classes[int(np.argmax(p))] for p in probs],
            "reference": [classes[i % 3] for i in range(30)],
            "task": "label",
            **{f"score_{c}": probs[:, k] for k, c in enumerate(classes)},
        }
    )
    src = tmp_path / "cnn"
    src.mkdir()
    write_predictions(src / "predictions.csv", df)
    atomic_write_json(
        src / "COMPLETE.json",
        {"predictions": "predictions.csv", "classes": classes, "checkpoint": "checkpoints/epoch-7"},
    )
    cfg = load_config(
        TINY, [f"output_root={tmp_path / 'runs'}", "run_id=c", "eval.n_bootstrap=0", f"eval.predictions={src}"]
    )
    acc = _events(run_eval(cfg) / "tensorboard")
    assert {"eval/confusion", "eval/roc", "eval/worst_samples"} <= set(acc.Tags()["images"])
    assert acc.Scalars("eval/macro_auc")[0].step == 7  # the cnn checkpoint's epoch
    assert acc.Histograms("eval/p_reference")[0].histogram_value.num == 30
    assert [e.step for e in _events(src / "tensorboard" / "eval-predictions").Scalars("eval/accuracy")] == [7]
