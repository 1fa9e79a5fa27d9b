"""`pretrain`: contrastive open_clip pretraining through the launcher learns the synthetic HAM10000 (zero-shot and
retrieval above chance), resumes exactly after SIGKILL and SIGUSR2, gathers features with gradients across 2
processes (the same steps as one process with the whole batch), writes what eval/compare read, takes a local
transformers text tower, and its ViT becomes the LLaVA vision tower exactly."""

import json
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
from conftest import ROOT, TINY_PRETRAIN
from medlava.config import ConfigError, PretrainConfig, load_config
from medlava.io import InputError
from medlava.models.clip import build_clip, create, load_clip, model_config
from medlava.models.vision_tower import clip_vision_config, to_clip_vision_model
from medlava.pretrain.data import caption, pairs_of, zero_shot_task
from medlava.pretrain.metrics import describe, retrieval_metrics
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SUBMIT = ROOT / "launch" / "submit.py"
SAVE = "pretrain.save_every=20"


def run_cmd(*args, env, check=True):
    out = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def scalars(run: Path, tag: str = "train/loss") -> dict[int, float]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(
        str(run / json.loads((run / "COMPLETE.json").read_text())["checkpoint"] / "open_clip_model.safetensors")
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """prepare, then `python launch/submit.py pretrain --config jobs/configs/tiny_pretrain.yaml --executor local`."""
    tmp = tmp_path_factory.mktemp("pretrain")
    env = {**os.environ, "MEDLAVA_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    base = [f"output_root={tmp / 'runs'}", f"data.root={tmp / 'ham'}"]
    run_cmd("-m", "medlava", "prepare", "--config", TINY_PRETRAIN, *base, "run_id=p", env=env)
    tic = time.perf_counter()
    out = run_cmd(
        SUBMIT, "pretrain", "--config", TINY_PRETRAIN, "--executor", "local", *base, SAVE, "run_id=whole", env=env
    )
    return {
        "tmp": tmp,
        "env": env,
        "base": base,
        "run": tmp / "runs" / "tiny" / "pretrain" / "whole",
        "prepared": tmp / "runs" / "tiny" / "prepare" / "p",
        "seconds": time.perf_counter() - tic,
        "out": out,
    }


def test_launcher_trains_and_zero_shot_and_retrieval_beat_chance(trained):
    run = trained["run"]
    assert trained["seconds"] < 180, trained["seconds"]
    assert "pretrain" in trained["out"].stdout and str(run) in trained["out"].stdout
    m = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "train_info.json").read_text())
    assert m["family"] == "classification" and m["n"] == info["pairs"]["test"] > 0
    chance = m["zero_shot"]["chance_balanced_accuracy"]
    assert chance == pytest.approx(1 / 7)
    assert m["balanced_accuracy"] > chance + 0.25 and m["macro_auc"] > 0.75, m
    r = m["retrieval"]
    assert f"pretrain: {describe(r)}; zero-shot balanced accuracy" in trained["out"].stdout  # chance beside each
    for way in ("image_to_text", "text_to_image"):
        assert r[way]["recall@5"] > r["chance"][way]["recall@5"] + 0.15, r
        assert r[way]["recall@1"] <= r[way]["recall@5"] <= r[way]["recall@10"]
    losses = scalars(run)
    assert sorted(losses) == list(range(1, len(losses) + 1))
    assert np.mean([losses[s] for s in sorted(losses)[-10:]]) < np.mean([losses[s] for s in sorted(losses)[:10]]) - 0.5
    assert set(scalars(run, "train/logit_scale")) == set(losses)
    ckpt = run / json.loads((run / "COMPLETE.json").read_text())["checkpoint"]
    assert {"open_clip_config.json", "open_clip_model.safetensors", "medlava.json"} <= {p.name for p in ckpt.iterdir()}


def test_eval_and_compare_read_the_zero_shot_predictions(trained, tmp_path):
    run, env = trained["run"], trained["env"]
    pred = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert [f"score_{c}" for c in classes] == [c for c in pred.columns if c.startswith("score_")]
    np.testing.assert_allclose(pred[[f"score_{c}" for c in classes]].sum(axis=1), 1, atol=1e-5)
    run_cmd(
        "-m",
        "medlava",
        "eval",
        "--predictions",
        run / "predictions.csv",
        "--out",
        tmp_path / "ev",
        "--n-bootstrap",
        "50",
        env=env,
    )
    ours, theirs = (
        json.loads((run / "metrics.json").read_text()),
        json.loads((tmp_path / "ev" / "metrics.json").read_text()),
    )
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        assert ours[k] == pytest.approx(theirs[k])
    run_cmd(
        "-m",
        "medlava",
        "compare",
        f"clip={run}",
        tmp_path / "ev",
        "--out",
        tmp_path / "cmp",
        "--n-bootstrap",
        "50",
        env=env,
    )
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert table["accuracy"][0] == pytest.approx(table["accuracy"][1]) == pytest.approx(ours["accuracy"])


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGUSR2, 75)])
def test_interrupted_run_resumes_to_the_same_weights_and_loss_curve(trained, sig, code):
    tmp, env, base = trained["tmp"], trained["env"], trained["base"]
    run_id = f"cut-{sig.name}"
    cmd = [sys.executable, "-m", "medlava", "pretrain", "--config", str(TINY_PRETRAIN), *base, SAVE, f"run_id={run_id}"]
    ckpts = tmp / "runs" / "tiny" / "pretrain" / run_id / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (ckpts / "step-000020").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    assert proc.wait() == code
    run = ckpts.parent
    assert not (run / "COMPLETE.json").exists(), "the run finished before it could be interrupted"
    steps_done = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    total = max(scalars(trained["run"]))
    assert 20 <= steps_done < total
    if sig == signal.SIGUSR2:  # saved at the step it stopped, all of whose losses were logged
        assert max(scalars(run)) == steps_done

    out = run_cmd(*cmd[1:], env=env)
    assert f"resumed from {ckpts}/step-{steps_done:06d}" in out.stderr
    a, b = final_weights(trained["run"]), final_weights(run)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = scalars(trained["run"]), scalars(run)
    assert sorted(la) == sorted(lb) == list(range(1, total + 1))
    assert [lb[s] for s in sorted(lb)] == pytest.approx([la[s] for s in sorted(la)], rel=1e-4)
    ma, mb = json.loads((trained["run"] / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert mb["retrieval"] == ma["retrieval"] and mb["accuracy"] == ma["accuracy"]


def test_two_processes_gather_features_with_gradients_like_one_process_with_the_whole_batch(trained):
    """gloo, gather_with_grad + local_loss: rank r scores its 8 rows against all 16; the mean over ranks is the
    loss of the 16-pair batch one process sees, and the gradients (through all_gather's backward and DDP's mean)
    are its gradients, so losses and weights match step for step."""
    tmp, env, base = trained["tmp"], trained["env"], trained["base"]
    steps = ["pretrain.max_steps=4", "pretrain.warmup_ratio=0"]
    run_cmd(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "medlava",
        "pretrain",
        "--config",
        TINY_PRETRAIN,
        *base,
        *steps,
        "pretrain.batch_size=8",
        "run_id=ddp",
        env=env,
    )
    run_cmd(
        "-m",
        "medlava",
        "pretrain",
        "--config",
        TINY_PRETRAIN,
        *base,
        *steps,
        "pretrain.batch_size=16",
        "run_id=one",
        env=env,
    )
    ddp, one = tmp / "runs" / "tiny" / "pretrain" / "ddp", tmp / "runs" / "tiny" / "pretrain" / "one"
    info = json.loads((ddp / "train_info.json").read_text())
    assert info["world_size"] == 2 and info["contrastive_batch"] == 16
    la, lb = scalars(ddp), scalars(one)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    assert [la[s] for s in range(1, 5)] == pytest.approx([lb[s] for s in range(1, 5)], rel=2e-4)
    # Adam divides by the gradient's size, so a float-rounding difference in a near-zero gradient can move that
    # weight by up to ~lr; the weights as a whole agree to rounding.
    a, b = final_weights(ddp), final_weights(one)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max() < 2e-3 and diffs.mean() < 1e-5, (diffs.max(), diffs.mean())
    # evaluation is sharded over the ranks and gathered: the same numbers as one process computes
    assert (
        json.loads((ddp / "metrics.json").read_text())["retrieval"]["n_images"]
        == json.loads((one / "metrics.json").read_text())["retrieval"]["n_images"]
    )


def test_submit_runs_pretrain_under_torchrun_like_the_other_training_stages(trained):
    out = run_cmd(
        SUBMIT,
        "pretrain",
        "--config",
        TINY_PRETRAIN,
        "--executor",
        "local",
        "--gpus",
        "4",
        "--dry-run",
        *trained["base"],
        env=trained["env"],
    )
    cmds = [line for line in out.stdout.splitlines() if "-m medlava" in line]
    assert len(cmds) == 1 and "--nproc_per_node=4 --standalone -m medlava pretrain --config" in cmds[0]


# -- the open_clip ViT as the LLaVA vision tower -----------------------------------------------------------------


def _open_clip_hidden_states(visual, images: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in visual.transformer.resblocks]
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(len(images), 1, -1)
    embedded = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
    visual(images)
    for h in hooks:
        h.remove()
    return [embedded, *outs]


@pytest.mark.parametrize("quick_gelu, eps", [(False, None), (True, 1e-6)])
def test_open_clip_vit_converts_exactly_to_clip_vision_model(quick_gelu, eps):
    cfg = model_config(PretrainConfig(model="medlava-tiny-clip"))
    cfg["quick_gelu"] = quick_gelu
    cfg["vision_cfg"].update(layers=3, mlp_ratio=2.5)
    if eps:
        cfg["vision_cfg"]["norm_kwargs"] = {"eps": eps}
    torch.manual_seed(0)
    clip = build_clip(cfg, {}, pretrained_text=False).eval()
    from medlava.models.clip import ClipModule, tokenizer_for

    vision = to_clip_vision_model(ClipModule(clip, cfg, tokenizer_for(cfg)), "test")
    assert vision.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert vision.config.intermediate_size == 80 and vision.config.layer_norm_eps == (eps or 1e-5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = vision(images, output_hidden_states=True)
        theirs = _open_clip_hidden_states(clip.visual, images)
        assert len(ours.hidden_states) == len(theirs) == 4
        for a, b in zip(ours.hidden_states, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.pooler_output, clip.visual.ln_post(theirs[-1][:, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"timm_model_name": "vit_base_patch16_224"}, "timm trunk (vit_base_patch16_224, as BiomedCLIP's)"),
        ({"ls_init_value": 0.1}, "{'ls_init_value': 0.1} have no CLIPVisionModel counterpart"),
        ({"no_ln_pre": True}, "'no_ln_pre': True"),
        ({"layers": [2, 2, 2, 2]}, "is a ResNet"),
    ],
)
def test_architectures_without_an_exact_counterpart_are_refused(change, needle):
    cfg = model_config(PretrainConfig(model="medlava-tiny-clip"))
    cfg["vision_cfg"].update(change)
    with pytest.raises(InputError, match="does not approximate|ResNet") as e:
        clip_vision_config(cfg, "some/encoder")
    assert needle in str(e.value) and "some/encoder" in str(e.value)


def test_pretrained_encoder_is_the_llava_vision_tower_through_the_same_path(trained):
    """model.vision_tower=<pretrain run>: align loads the tiny LLaVA with it (base_model_path, load_model) and
    trains; the loaded tower computes the open_clip ViT's hidden states."""
    tmp, env = trained["tmp"], trained["env"]
    tiny = ROOT / "jobs" / "configs" / "tiny.yaml"
    args = [f"output_root={tmp / 'runs'}", f"data.root={tmp / 'ham'}", f"model.vision_tower={trained['run']}"]
    run_cmd("-m", "medlava", "align", "--config", tiny, *args, "align.max_steps=2", "run_id=tower", env=env)
    assert (tmp / "runs" / "tiny" / "align" / "tower" / "COMPLETE.json").exists()

    os.environ["MEDLAVA_CACHE"] = env["MEDLAVA_CACHE"]
    from medlava.models.llava import base_model_path, load_model, load_processor

    cfg = load_config(tiny, args)
    path = base_model_path(cfg.model)
    model, processor = load_model(path, cfg.model, torch.float32), load_processor(path, cfg.model)
    clip = load_clip(trained["run"] / json.loads((trained["run"] / "COMPLETE.json").read_text())["checkpoint"])
    assert list(processor.image_processor.image_mean) == list(clip.clip.visual.preprocess_cfg["mean"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.model.vision_tower(images, output_hidden_states=True).hidden_states
        theirs = _open_clip_hidden_states(clip.clip.visual, images)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- a transformers text tower from a local path (the real recipe's PubMedBERT) ---------------------------------


def _tiny_bert(path: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "a an the of on image dermoscopy melanoma nevus back chest x-ray showing lesion".split()
    (path).mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "."]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(words) + 6,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(path)
    return path


def test_local_text_tower_trains_and_the_checkpoint_loads_on_its_own(trained, tmp_path):
    tmp, env = trained["tmp"], trained["env"]
    bert = _tiny_bert(tmp_path / "bert")
    run_cmd(
        "-m",
        "medlava",
        "pretrain",
        "--config",
        TINY_PRETRAIN,
        *trained["base"],
        f"pretrain.text_tower={bert}",
        "pretrain.context_length=16",
        "pretrain.max_steps=3",
        "pretrain.gradient_checkpointing=true",
        "run_id=bert",
        env=env,
    )
    run = tmp / "runs" / "tiny" / "pretrain" / "bert"
    ckpt = run / json.loads((run / "COMPLETE.json").read_text())["checkpoint"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in ckpt.iterdir()}
    saved = json.loads((ckpt / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert saved["hf_model_name"] == str(bert) and saved["context_length"] == 16
    clip = load_clip(ckpt)
    assert type(clip.clip).__name__ == "CustomTextCLIP"
    tokens = clip.tokenizer(["a dermoscopy image of melanoma."])
    assert tokens.shape == (1, 16) and int(tokens[0, 0]) == 2  # [CLS]
    state = load_file(str(ckpt / "open_clip_model.safetensors"))
    for k, v in clip.clip.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert any(k.startswith("text.transformer.") for k in state)


def test_real_recipe_builds_vit_b16_with_the_local_text_tower(tmp_path):
    recipe = ROOT / "jobs" / "configs" / "pretrain_vitb16_pubmedbert.yaml"
    bert = _tiny_bert(tmp_path / "pubmedbert")
    cfg = load_config(recipe, [f"pretrain.text_tower={bert}"])
    model_cfg = model_config(cfg.pretrain)
    assert model_cfg["vision_cfg"] == {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}
    assert model_cfg["text_cfg"]["hf_model_name"] == str(bert) and model_cfg["text_cfg"]["context_length"] == 256
    assert cfg.pretrain.gather_with_grad and cfg.pretrain.local_loss and cfg.pretrain.gradient_checkpointing
    assert clip_vision_config(model_cfg, "recipe").num_hidden_layers == 12  # it can become a LLaVA tower


# -- pieces ----------------------------------------------------------------------------------------------------


def test_captions_follow_each_dataset():
    ham = {
        "id": "1",
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "mel"}],
        "meta": {"dataset": "ham10000", "label": "mel", "localization": "back"},
    }
    assert caption(ham) == "a dermoscopy image of melanoma on the back"
    assert caption({**ham, "meta": {**ham["meta"], "localization": "unknown"}}) == "a dermoscopy image of melanoma"
    report = {
        "id": "2",
        "image": "b.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the findings of the chest X-ray."},
            {"from": "gpt", "value": "Small left pleural effusion."},
        ],
        "meta": {"dataset": "mimic_cxr", "task": "report"},
    }
    assert caption(report) == "Small left pleural effusion."
    slake = {
        "id": "3",
        "image": "c.jpg",
        "conversations": [{"from": "human", "value": "<image>\nIs the liver normal?"}, {"from": "gpt", "value": "Yes"}],
        "meta": {"dataset": "slake", "task": "closed", "modality": "CT", "location": "Abdomen"},
    }
    assert caption(slake) == "a CT image of the abdomen. Is the liver normal? Yes"
    second = {
        **slake,
        "id": "4",
        "conversations": [{"from": "human", "value": "<image>\nWhich organ?"}, {"from": "gpt", "value": "Liver"}],
    }
    pairs = pairs_of([slake, second, {**report, "image": None}], Path("x.jsonl"))
    assert len(pairs) == 1 and pairs[0].caption.endswith("Yes a CT image of the abdomen. Which organ? Liver")
    with pytest.raises(InputError, match="x.jsonl: sample 2 gives an empty caption"):
        pairs_of([{**report, "conversations": [{"from": "gpt", "value": " "}]}], Path("x.jsonl"))


def test_chexpert_zero_shot_takes_studies_with_one_competition_label():
    def pair(labels):
        return {
            "id": str(len(labels)),
            "image": f"{labels}.png",
            "conversations": [{"from": "gpt", "value": "x"}],
            "meta": {"dataset": "mimic_cxr", "task": "report", "chexpert": labels},
        }

    samples = [pair({"Edema": 1, "Atelectasis": 0}), pair({"Edema": 1, "Cardiomegaly": 1}), pair({"Edema": -1})]
    task = zero_shot_task(pairs_of(samples, Path("x")), None, [])
    assert task.classes == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert task.labelled == [(0, 3)] and task.templates == ["a chest x-ray showing {}."]
    assert zero_shot_task(pairs_of(samples[1:], Path("x")), None, []) is None


def test_retrieval_counts_repeated_captions_once_and_knows_chance():
    e = np.eye(3, dtype=np.float32)
    images = np.stack([e[0], e[0], e[1], e[2] * 0.9 + e[0] * 0.1])
    texts = np.stack([e[0], e[0], e[1], e[1]])  # image 3's caption is "b", but it looks like "a"
    m = retrieval_metrics(images, texts, ["a", "a", "b", "c"], ks=(1, 2))
    assert m["n_captions"] == 3  # "c" embeds like "b": image 2 ties them (a hit); image 3 ranks "a" first (a miss)
    assert m["image_to_text"]["recall@1"] == pytest.approx(3 / 4) and m["image_to_text"]["recall@2"] == 1
    assert m["text_to_image"]["recall@1"] == pytest.approx(2 / 3)  # image 2 outranks "c"'s only image
    assert m["chance"]["image_to_text"]["recall@1"] == pytest.approx(1 / 3)
    # caption "a": 2 of 4 images are relevant; random top-1 finds one with probability 1/2, top-2 with 5/6
    assert m["chance"]["text_to_image"]["recall@1"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)
    assert m["chance"]["text_to_image"]["recall@2"] == pytest.approx((5 / 6 + 1 / 2 + 1 / 2) / 3)
    assert describe(m) == (
        "image->text R@1 0.750 (chance 0.333), R@2 1.000 (chance 0.667); "
        "text->image R@1 0.667 (chance 0.333), R@2 1.000 (chance 0.611)"
    )
    m10 = retrieval_metrics(images, texts, ["a", "a", "b", "c"], ks=(1, 10, 2))
    assert describe(m10).startswith("image->text R@1 0.750 (chance 0.333), R@2 1.000 (chance 0.667), R@10 ")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("pretrain.prompt_templates=[a photo]", "must each hold one `{}`"),
        ("pretrain.batch_size=1", "pretrain.batch_size"),
        ("pretrain.model=ViT-Q-99", "pretrain.model=ViT-Q-99 is not an open_clip model config"),
    ],
)
def test_bad_pretrain_settings_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match="pretrain") as e:
        create(load_config(TINY_PRETRAIN, [override]).pretrain)
    assert needle in str(e.value)


def test_missing_text_tower_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain.text_tower=.* holds no config.json: give a local"):
        model_config(PretrainConfig(model="medlava-tiny-clip", text_tower=str(tmp_path)))


def test_a_diverging_pretrain_stops_and_a_resume_with_other_settings_is_refused(trained):
    """The contrastive loop's share of the training guards (test_train.py holds the VLM's)."""
    env, base = trained["env"], trained["base"]
    args = ["-m", "medlava", "pretrain", "--config", TINY_PRETRAIN, *base]
    out = run_cmd(*args, "run_id=nan", "pretrain.lr=1e30", env=env, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.search(
        r"medlava pretrain: training diverged: the loss is nan at step \d+ \(.*\); no checkpoint of it "
        r"is written and the run is not complete\. Lower pretrain\.lr \(now 1e\+30\)",
        out.stderr,
    ), out.stderr[-3000:]
    stopped = trained["run"].with_name("resumed-other")  # the finished run, as if killed before COMPLETE.json
    shutil.copytree(trained["run"], stopped)
    (stopped / "COMPLETE.json").unlink()
    out = run_cmd(
        *args, SAVE, "run_id=resumed-other", "pretrain.batch_size=16", "pretrain.eval_split=val", env=env, check=False
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.search(
        r"medlava pretrain: \S+/resumed-other/checkpoints/step-\d+ was trained with other settings "
        r"\(pretrain\.batch_size: 32 then, 16 now\); resuming it",
        out.stderr,
    ), out.stderr[-3000:]
