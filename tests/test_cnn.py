"""CNN baselines: the metadata model learns the synthetic HAM10000, prediction needs only the checkpoint, two-phase
training freezes what it says, resume after a stop request is exact, 2-process DDP, and `compare` / `eval` read
CNN predictions as they read the VLM's."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CNN, complete_runs, torchrun
from medlava.config import ConfigError, load_config
from medlava.data.samples import read_samples
from medlava.eval.classification import classification_metrics
from medlava.io import InputError
from medlava.models.cnn import (
    CnnClassifier,
    ItemDataset,
    MetaEncoder,
    keep_frozen_statistics,
    load_cnn,
    new_spec,
    set_phase,
)
from medlava.train.cnn import (
    Augmented,
    class_weights,
    epoch_order,
    sample_items,
    seed_of,
    train_transform,
)
from medlava.train.optim import make_optimizer
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def medlava(*args, env, check=True, **kw):
    out = subprocess.run(
        [sys.executable, "-m", "medlava", *map(str, args)], env=env, capture_output=True, text=True, **kw
    )
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def scalars(run: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny CNN preset (resnet18 + metadata branch, two phases) trained on a synthetic HAM10000."""
    tmp = tmp_path_factory.mktemp("cnn")
    env = {**os.environ, "MEDLAVA_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    base = ["--config", TINY_CNN, f"output_root={tmp / 'runs'}", f"data.root={tmp / 'ham'}"]
    medlava("prepare", *base, "run_id=p", env=env)
    tic = time.perf_counter()
    out = medlava("cnn", *base, "run_id=c", env=env)
    return {
        "tmp": tmp,
        "env": env,
        "base": base,
        "run": tmp / "runs" / "tiny" / "cnn" / "c",
        "prepared": tmp / "runs" / "tiny" / "prepare" / "p",
        "seconds": time.perf_counter() - tic,
        "log": out.stderr,
    }


# -- the stage --------------------------------------------------------------------------------------------------


def test_metadata_model_beats_the_majority_class(trained):
    run, prepared = trained["run"], trained["prepared"]
    done = json.loads((run / "COMPLETE.json").read_text())
    info = json.loads((run / "train_info.json").read_text())
    assert info["arch"] == "resnet18" and info["metadata"]["sexes"][0] == "unknown"
    test_ids = sorted(s["id"] for s in read_samples(prepared / "test.jsonl"))
    pred = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert sorted(pred["id"]) == test_ids and set(pred["task"]) == {"label"}
    scores = pred[[f"score_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(scores.sum(1), 1, atol=1e-5)
    assert (pred["prediction"] == np.array(CLASSES)[scores.argmax(1)]).all()

    train_labels = pd.Series([s["meta"]["label"] for s in read_samples(prepared / "train.jsonl")])
    majority = pred.assign(prediction=train_labels.mode()[0])  # always the most frequent training class
    base = classification_metrics(majority, CLASSES, n_bootstrap=0)
    # `medlava eval` scores the CNN's predictions.csv exactly as it scores an infer run's
    out = medlava(
        "eval", "--predictions", run, "--out", trained["tmp"] / "eval", "--n-bootstrap", "200", env=trained["env"]
    )
    m = json.loads((trained["tmp"] / "eval" / "metrics.json").read_text())
    assert "macro_f1" in out.stdout and m["n"] == len(test_ids) and m["unmapped"] == 0
    assert m["accuracy"] > base["accuracy"] + 0.1, (m["accuracy"], base["accuracy"])
    assert m["balanced_accuracy"] > 0.45 > base["balanced_accuracy"]
    assert m["macro_f1"] > base["macro_f1"] + 0.3
    assert m["macro_auc"] > 0.85
    assert done["best_val"]["macro_f1"] == max(h for h in pd.read_csv(run / "history.csv")["val_macro_f1"])
    print(
        f"cnn stage: {trained['seconds']:.1f} s; test accuracy {m['accuracy']:.3f} (majority "
        f"{base['accuracy']:.3f}), macro-F1 {m['macro_f1']:.3f} (majority {base['macro_f1']:.3f})"
    )


def test_phases_train_what_train_info_says_and_log_their_rates(trained):
    run = trained["run"]
    cfg = load_config(TINY_CNN)
    phases = json.loads((run / "train_info.json").read_text())["phases"]
    p1, p2 = phases
    assert p1["epochs"] == [0, 1] and p1["trainable_groups"] == 0 and p1["lr"] == cfg.cnn.lr
    assert p2["trainable_groups"] == p2["backbone_groups"] == 9 and p2["lr"] == cfg.cnn.finetune_lr
    model, _ = load_cnn(run / json.loads((run / "COMPLETE.json").read_text())["checkpoint"])
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert p1["parameters"]["trainable"] == outside  # head + metadata branch only
    assert p2["parameters"]["frozen"] == 0
    lr = scalars(run, "train/lr")
    per_epoch = json.loads((run / "train_info.json").read_text())["steps_per_epoch"]
    first, second = [v for s, v in lr.items() if s <= per_epoch], [v for s, v in lr.items() if s > per_epoch]
    assert cfg.cnn.finetune_lr < max(first) <= cfg.cnn.lr  # cosine within each phase, from the phase's rate
    assert 0.9 * cfg.cnn.finetune_lr < max(second) <= cfg.cnn.finetune_lr
    assert set(scalars(run, "val/macro_f1")) == {per_epoch * e for e in range(1, len(scalars(run, "val/macro_f1")) + 1)}
    assert (run / "curves.png").stat().st_size > 5000


def test_prediction_needs_only_the_checkpoint(trained, tmp_path):
    """Move the training data and the prepared splits away: `medlava predict` on a copy of the checkpoint
    reproduces the stage's test predictions (metadata encoded with the vocabularies and age statistics
    saved in it)."""
    run, prepared = trained["run"], trained["prepared"]
    done = json.loads((run / "COMPLETE.json").read_text())
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / done["checkpoint"], ckpt)
    spec = json.loads((ckpt / "cnn.json").read_text())
    assert spec["meta"] == json.loads((run / "train_info.json").read_text())["metadata"]
    assert spec["classes"] == CLASSES and spec["image_size"] == 48

    images = tmp_path / "cases"
    images.mkdir()
    rows = []
    for s in read_samples(prepared / "test.jsonl"):
        shutil.copy(Path(json.loads((prepared / "dataset.json").read_text())["image_root"]) / s["image"], images)
        m = s["meta"]
        rows.append(
            {
                "image": Path(s["image"]).name,
                "id": s["id"],
                "age": m["age"],
                "sex": m["sex"],
                "localization": m["localization"],
                "dx": m["label"],
            }
        )
    pd.DataFrame(rows).to_csv(images / "cases.csv", index=False)
    away = trained["tmp"] / "away"
    away.mkdir()
    for path in (trained["tmp"] / "ham", trained["tmp"] / "runs"):
        shutil.move(path, away / path.name)
    try:
        medlava(
            "predict",
            "--checkpoint",
            ckpt,
            "--images",
            images / "cases.csv",
            "--out",
            tmp_path / "p.csv",
            env=trained["env"],
            cwd=tmp_path,
        )
    finally:
        for path in away.iterdir():
            shutil.move(path, trained["tmp"] / path.name)
    ours = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("id")
    stage = pd.read_csv(run / "predictions.csv", keep_default_na=False).set_index("id").loc[ours.index]
    cols = [f"score_{c}" for c in CLASSES]
    np.testing.assert_allclose(ours[cols].to_numpy(), stage[cols].to_numpy(), atol=1e-5)
    assert (ours["prediction"] == stage["prediction"]).all() and (ours["reference"] == stage["reference"]).all()

    # The same images without metadata (a folder): median age and "unknown" fill in, the answer changes
    (images / "cases.csv").unlink()
    out = medlava(
        "predict", "--checkpoint", ckpt, "--images", images, "--out", tmp_path / "bare.csv", env=trained["env"]
    )
    n, median = len(ours), spec["meta"]["age_median"]
    assert (
        f"filled with training defaults (the model uses patient metadata): age missing for {n} of {n} image(s): "
        f"the training median age {median:g}; sex missing for {n} of {n} image(s): 'unknown'; localization "
        f"missing for {n} of {n} image(s): 'unknown'"
    ) in out.stderr
    bare = pd.read_csv(tmp_path / "bare.csv", keep_default_na=False).set_index("id").loc[ours.index]
    assert np.abs(bare[cols].to_numpy() - ours[cols].to_numpy()).max() > 1e-3


def test_stop_request_checkpoints_and_a_rerun_resumes_exactly(trained):
    """SIGUSR2 (SLURM's warning before the time limit): a checkpoint at the step it stopped, exit 75; the re-run
    continues there and ends with the uninterrupted run's weights and predictions."""
    tmp, env, base = trained["tmp"], trained["env"], trained["base"]
    cmd = [sys.executable, "-m", "medlava", "cnn", *map(str, base), "run_id=stopped"]
    ckpts = tmp / "runs" / "tiny" / "cnn" / "stopped" / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (ckpts / "epoch-002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # most often into epoch 3; at an epoch's end the stop is checked too
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait() == 75, proc.stderr.read()[-3000:]
    assert not (ckpts.parent / "COMPLETE.json").exists()
    newest = max(tuple(int(x) for x in p.name.split("-")[1::2]) for p in ckpts.glob("epoch-*"))
    assert (2,) <= newest < (8,), newest  # (epoch, step): where it stopped, before the end

    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "resumed from" in out.stderr, out.stderr[-3000:]
    a, b = trained["run"], ckpts.parent
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    assert hb["epoch"].tolist() == ha["epoch"].tolist()
    np.testing.assert_allclose(hb["val_loss"], ha["val_loss"], rtol=1e-4)
    wa = load_file(str(a / json.loads((a / "COMPLETE.json").read_text())["checkpoint"] / "model.safetensors"))
    wb = load_file(str(b / json.loads((b / "COMPLETE.json").read_text())["checkpoint"] / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_two_processes_train_under_torchrun(trained):
    tmp, env, base = trained["tmp"], trained["env"], trained["base"]
    out = subprocess.run(
        [*torchrun(2), "-m", "medlava", "cnn", *map(str, base), "run_id=ddp", "cnn.epochs=3"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp / "runs" / "tiny" / "cnn" / "ddp"
    info = json.loads((run / "train_info.json").read_text())
    assert info["world_size"] == 2
    single = json.loads((trained["run"] / "train_info.json").read_text())
    assert info["steps_per_epoch"] == -(-info["samples"]["train"] // 2) // 16 < single["steps_per_epoch"]
    pred = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert sorted(pred["id"]) == sorted(s["id"] for s in read_samples(trained["prepared"] / "test.jsonl"))
    assert len(pd.read_csv(run / "history.csv")) == 3


def test_compare_lines_up_cnn_and_eval_runs(trained, tmp_path):
    """A cnn run (scored in memory from predictions.csv) and an eval run of the same predictions give one table
    with the same numbers."""
    ev = tmp_path / "eval"
    medlava(
        "eval",
        "--predictions",
        trained["run"] / "predictions.csv",
        "--out",
        ev,
        "--n-bootstrap",
        "100",
        env=trained["env"],
    )
    out = medlava(
        "compare", f"cnn={trained['run']}", ev, "--out", tmp_path / "cmp", "--n-bootstrap", "100", env=trained["env"]
    )
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert table["run"].tolist() == ["cnn", f"{tmp_path.parts[-2]}/{tmp_path.name}/eval"]
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        assert table[m][0] == pytest.approx(table[m][1])
        assert 0 <= table[f"{m}_ci_low"][0] <= table[f"{m}_ci_high"][0] <= 1
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md in out.stdout and "| Run | n | Accuracy | Balanced accuracy | Macro-F1 | Macro-AUC |" in md
    assert f"| cnn | {table['n'][0]} | {table['accuracy'][0]:.3f} [" in md
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 5000


def test_compare_refuses_what_it_cannot_line_up(tmp_path):
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "metrics.json").write_text(json.dumps({"family": "vqa", "n_closed": 3}))
    out = subprocess.run(
        [sys.executable, "-m", "medlava", "compare", str(tmp_path / "vqa"), str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "vqa metrics; compare lines up classification runs" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "medlava", "compare", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "none does not exist" in out.stderr


# -- the model and its parts ------------------------------------------------------------------------------------


def test_meta_encoder_fills_missing_values_with_training_statistics():
    metas = [
        {"age": 30.0, "sex": "male", "localization": "back"},
        {"age": 50.0, "sex": "Female ", "localization": None},
        {"age": None, "sex": "unknown", "localization": "face"},
        {"age": 70.0, "sex": None, "localization": "back"},
    ]
    enc = MetaEncoder.fit(metas)
    assert enc.sexes == ("unknown", "female", "male") and enc.localizations == ("unknown", "back", "face")
    assert (enc.age_mean, enc.age_median) == (50.0, 50.0) and enc.age_std == pytest.approx(np.std([30, 50, 70]))
    assert enc.encode({"age": 70.0, "sex": "male", "localization": "face"}) == pytest.approx((20 / enc.age_std, 2, 2))
    assert enc.encode({}) == (0.0, 0, 0)  # median age, unknown, unknown
    assert enc.encode({"age": float("nan"), "sex": "FEMALE", "localization": "scalp"}) == (0.0, 1, 0)
    assert enc.unseen([{"localization": "scalp"}, {"sex": "male"}]) == {"localization": ["scalp"]}
    assert enc.missing([{"localization": "scalp"}, {"sex": "male", "age": 3.0}, {"age": ""}]) == {
        "age": (2, "the training median age 50"),
        "sex": (2, "'unknown'"),
        "localization": (2, "'unknown'"),
    }
    assert enc.missing([{"age": 1, "sex": "x", "localization": "y"}]) == {}
    with pytest.raises(InputError, match="no training sample has an age"):
        MetaEncoder.fit([{"sex": "male"}])


@pytest.mark.parametrize(
    "fraction, open_prefixes",
    [
        (0.5, ("layer2.1.", "layer3.", "layer4.")),  # ceil(0.5 x 9 groups) = the last 5 blocks
        (0.2, ("layer4.",)),  # ceil(1.8) = 2: layer4.0 and layer4.1
        (1.0, ("",)),
    ],
)
def test_two_phases_freeze_and_unfreeze_exactly_the_parameters_they_say(fraction, open_prefixes):
    """Phase 1 trains only the head and the metadata branch; phase 2 opens the last `fraction` of resnet18's
    nine layer groups (stem, layer1.0 ... layer4.1). Training changes exactly what is open; frozen batch norms
    keep their running statistics too."""
    torch.manual_seed(0)
    meta = MetaEncoder(("unknown", "female", "male"), ("unknown", "back"), 50.0, 15.0, 50.0)
    model = CnnClassifier(new_spec("resnet18", CLASSES, 32, [16], 0.0, meta))
    batch = {
        "image": torch.randn(6, 3, 32, 32),
        "age": torch.randn(6),
        "sex": torch.tensor([0, 1, 2, 0, 1, 2]),
        "localization": torch.tensor([0, 1, 0, 1, 0, 1]),
    }
    labels = torch.arange(6)

    for frozen in (True, False):
        report = set_phase(model, frozen=frozen, unfreeze_fraction=fraction)
        expect_open = {
            n
            for n, _ in model.named_parameters()
            if not n.startswith("backbone.") or (not frozen and n.removeprefix("backbone.").startswith(open_prefixes))
        }
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expect_open
        open_count = sum(p.numel() for n, p in model.named_parameters() if n in expect_open)
        assert report["parameters"]["trainable"] == open_count
        assert report["trainable_groups"] == (0 if frozen else math.ceil(fraction * 9))

        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        keep_frozen_statistics(model)
        opt = make_optimizer(model, 1e-2, 0.01)
        for _ in range(2):  # timm zero-initialises each block's last norm: the first step cannot reach inside
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(**batch), labels).backward()
            opt.step()
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        params = {n for n, _ in model.named_parameters()}
        assert {k for k in changed if k in params} == expect_open
        for name, m in model.named_modules():  # running statistics move only where the weights are open
            if isinstance(m, torch.nn.BatchNorm2d):
                assert (f"{name}.running_mean" in changed) == (f"{name}.weight" in expect_open), name


def test_efficientnetv2_s_groups_its_blocks_and_opens_the_last_30_percent():
    """Seed 004: EfficientNetV2-S, its last 30% unfrozen in phase 2 (ceil(0.3 x 41 groups) = 13 blocks)."""
    model = CnnClassifier(new_spec("tf_efficientnetv2_s", CLASSES, 64, [512, 128], 0.3, None))
    report = set_phase(model, frozen=False, unfreeze_fraction=0.3)
    assert (report["backbone_groups"], report["trainable_groups"]) == (41, 13)
    assert report["first_trainable_group"].startswith("blocks.5.2.")  # groups 28..40 of 0..40
    open_backbone = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert {
        "conv_head.weight",
        "bn2.weight",
        "blocks.5.14.conv_pw.weight",
        "blocks.5.2.conv_pw.weight",
    } <= open_backbone
    assert "blocks.5.1.conv_pw.weight" not in open_backbone and "conv_stem.weight" not in open_backbone
    assert model.backbone.num_features == 1280 and model.head[-1].in_features == 128


def test_pretrained_weights_come_from_a_local_file_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm

    source = timm.create_model("resnet18", num_classes=1000)
    weights = {k: torch.full_like(v, 0.5) if k == "conv1.weight" else v for k, v in source.state_dict().items()}
    save_file(weights, str(tmp_path / "resnet18.safetensors"))
    spec = new_spec("resnet18", CLASSES, 32, [], 0.0, None)
    model = CnnClassifier(spec, pretrained=str(tmp_path / "resnet18.safetensors"))
    state = model.backbone.state_dict()
    assert torch.equal(state["conv1.weight"], weights["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], weights["layer4.1.bn2.running_var"])
    assert model.head[-1].out_features == 7 and "fc.weight" not in state  # ImageNet's classifier is dropped
    assert not torch.equal(CnnClassifier(spec).backbone.state_dict()["conv1.weight"], weights["conv1.weight"])


def test_checkpoint_round_trips_the_spec_and_weights(tmp_path):
    from medlava.models.cnn import save_cnn

    meta = MetaEncoder(("unknown", "male"), ("unknown", "back", "face"), 51.5, 16.2, 50.0)
    spec = new_spec("resnet18", CLASSES, 40, [8], 0.1, meta)
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))  # timm's record for resnet18's weights
    model = CnnClassifier(spec)
    save_cnn(tmp_path / "ck", model, spec, {"stage": "cnn"})
    loaded, spec2 = load_cnn(tmp_path / "ck")
    assert spec2 == spec and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert json.loads((tmp_path / "ck" / "medlava.json").read_text())["kind"] == "cnn"
    with pytest.raises(FileNotFoundError, match="not a CNN checkpoint"):
        load_cnn(tmp_path)


def test_augmentations_vary_per_seed_and_repeat_for_the_same_seed(tmp_path):
    from medlava.models.cnn import Item
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    spec = new_spec("resnet18", CLASSES, 32, [], 0.0, None)
    data = Augmented(ItemDataset([Item("a", tmp_path, "a.png", {}, 3)], train_transform(spec, True), None))
    x1, x2, y = data[(0, 11)], data[(0, 11)], data[(0, 12)]
    assert x1["image"].shape == (3, 32, 32) and x1["label"] == 3
    assert torch.equal(x1["image"], x2["image"]) and not torch.equal(x1["image"], y["image"])
    assert seed_of(0, 1, 2) == seed_of(0, 1, 2) != seed_of(0, 2, 1)


def test_class_balance_by_weights_or_by_sampling():
    from medlava.distributed import Dist

    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    w = class_weights(labels, ["a", "b", "c"])
    assert w.tolist() == pytest.approx([100 / (3 * 80), 100 / (3 * 15), 100 / (3 * 5)])
    one = Dist(0, 1, 0, torch.device("cpu"))
    draws = np.concatenate([labels[epoch_order(labels, True, 0, e, one)] for e in range(30)])
    assert np.bincount(draws, minlength=3) / len(draws) == pytest.approx([1 / 3] * 3, abs=0.03)
    assert sorted(epoch_order(labels, False, 0, 0, one)) == list(range(100))
    halves = [epoch_order(labels, False, 0, 0, Dist(r, 2, r, torch.device("cpu"))) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(100))
    with pytest.raises(InputError, match=r"class\(es\) \['d'\] have no training sample"):
        class_weights(labels, ["a", "b", "c", "d"])


def test_a_sample_with_a_bad_label_is_named(tmp_path):
    samples = [
        {"id": "x1", "image": "a.jpg", "meta": {"label": "nv"}},
        {"id": "x2", "image": "b.jpg", "meta": {"label": "melanoma"}},
    ]
    with pytest.raises(InputError, match=r"train.jsonl: sample x2 has label 'melanoma', not one of"):
        sample_items(samples, tmp_path, CLASSES, tmp_path / "train.jsonl")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("cnn.frozen_epochs=8", "cnn.frozen_epochs=8 leaves no epoch to fine-tune in (cnn.epochs=8)"),
        ("cnn.unfreeze_fraction=0", "cnn.unfreeze_fraction: Input should be greater than 0"),
        ("cnn.class_balance=oversample", "cnn.class_balance: Input should be 'none', 'weights' or 'sampler'"),
        ("cnn.archh=resnet50", "cnn.archh: unknown key. Did you mean cnn.arch?"),
    ],
)
def test_bad_cnn_settings_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CNN, [override])
    assert needle in str(e.value)
    with pytest.raises(ConfigError, match="cnn.finetune_lr is the rate after the frozen epochs"):
        load_config(TINY_CNN, ["cnn.frozen_epochs=0"])


def test_submit_runs_cnn_under_torchrun_like_the_other_training_stages(tmp_path):
    complete_runs(tmp_path, "prepare")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "cnn",
            "--config",
            str(TINY_CNN),
            "--dry-run",
            "--executor",
            "local",
            "--gpus",
            "4",
            "--output-root",
            str(tmp_path),
            "run_id=r1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    cmds = [line for line in out.stdout.splitlines() if " -m medlava " in line]
    assert len(cmds) == 1 and "--nproc_per_node=4 --standalone -m medlava cnn --config" in cmds[0]
    assert "run_id=r1" in cmds[0] and "cluster.gpus_per_node=4" in cmds[0]
    assert "arch: resnet18" in out.stdout


def test_missing_pretrained_file_is_refused_with_the_fix(trained):
    out = medlava(
        "cnn",
        *trained["base"],
        "run_id=nofile",
        "cnn.pretrained=/nowhere/w.safetensors",
        env=trained["env"],
        check=False,
    )
    assert out.returncode == 2
    assert "cnn.pretrained=/nowhere/w.safetensors does not exist" in out.stderr and "cnn.pretrained=null" in out.stderr
    assert not (trained["tmp"] / "runs" / "tiny" / "cnn" / "nofile").exists()  # refused before a run starts


def test_a_diverging_cnn_stops_and_a_resume_with_other_settings_is_refused(trained, tmp_path):
    """The CNN loop's share of the training guards (test_train.py holds the VLM's)."""
    env, base = trained["env"], trained["base"]
    out = medlava("cnn", *base, "run_id=nan", "cnn.lr=1e30", env=env, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.search(
        r"medlava cnn: training diverged: the loss is nan at step \d+ \(.*\); no checkpoint of it is "
        r"written and the run is not complete\. Lower cnn\.lr \(now 1e\+30\)",
        out.stderr,
    ), out.stderr[-3000:]
    assert not (trained["tmp"] / "runs" / "tiny" / "cnn" / "nan" / "COMPLETE.json").exists()

    stopped = trained["run"].with_name("resumed-other")  # the finished run, as if killed before COMPLETE.json
    shutil.copytree(trained["run"], stopped)
    (stopped / "COMPLETE.json").unlink()
    config = (stopped / "config.yaml").read_bytes()
    out = medlava("cnn", *base, "run_id=resumed-other", "cnn.lr=0.05", "cnn.predict_split=val", env=env, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.search(
        r"medlava cnn: \S+/resumed-other/checkpoints/epoch-\d+ was trained with other settings \(cnn\.lr: 0\.01 "
        r"then, 0\.05 now\); resuming it",
        out.stderr,
    ), out.stderr[-3000:]  # predict_split: not the weights
    assert (stopped / "config.yaml").read_bytes() == config
