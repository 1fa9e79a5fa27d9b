"""`medlava predict` on a VLM checkpoint scores the closed question exactly as `infer` does; the served page of a
VLM adds its free-text answer; bad rows of an input CSV are named with file, line and fix."""

import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from medlava.data.ham10000 import CLASSES, QUESTION
from medlava.data.samples import read_samples
from medlava.io import InputError
from medlava.models.cnn import Item
from medlava.tools.predict import read_csv, read_folder


def medlava(*args, env):
    out = subprocess.run([sys.executable, "-m", "medlava", *map(str, args)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A tiny LLaVA fine-tuned for two steps, and `infer` answers of its test split."""
    tmp = tmp_path_factory.mktemp("vlm")
    env = {**os.environ, "MEDLAVA_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    base = ["--config", TINY, f"output_root={tmp / 'runs'}", f"data.root={tmp / 'ham'}", "data.synthetic.n_lesions=30"]
    medlava("prepare", *base, "run_id=p", env=env)
    medlava("sft", *base, "run_id=s", "sft.init_from=none", "sft.max_steps=2", "sft.batch_size=4", env=env)
    sft = tmp / "runs" / "tiny" / "sft" / "s"
    medlava("infer", *base, "run_id=i", f"infer.checkpoint={sft}", "infer.chunks=1", env=env)
    prepared = tmp / "runs" / "tiny" / "prepare" / "p"
    samples = read_samples(prepared / "test.jsonl")
    pd.DataFrame(
        {
            "id": [s["id"] for s in samples],
            "image": [s["image"] for s in samples],
            "dx": [s["meta"]["label"] for s in samples],
        }
    ).to_csv(tmp / "test.csv", index=False)
    return {"tmp": tmp, "env": env, "sft": sft, "infer": tmp / "runs" / "tiny" / "infer" / "i", "samples": samples}


def test_vlm_predict_scores_like_infer(vlm):
    tmp = vlm["tmp"]
    out = medlava(
        "predict",
        "--checkpoint",
        vlm["sft"],
        "--images",
        tmp / "test.csv",
        "--image-root",
        tmp / "ham",
        "--out",
        tmp / "predict.csv",
        "--batch-size",
        "3",
        env=vlm["env"],
    )
    assert f"{len(vlm['samples'])} image(s), vlm" in out.stdout
    ours = pd.read_csv(tmp / "predict.csv", keep_default_na=False).set_index("id")
    theirs = pd.read_csv(vlm["infer"] / "predictions.csv", keep_default_na=False).set_index("id").loc[ours.index]
    cols = [f"score_{c}" for c in CLASSES]
    np.testing.assert_allclose(ours[cols].to_numpy(), theirs[cols].to_numpy(), atol=1e-5)
    assert (ours["prediction"] == theirs["prediction"]).all() and (ours["reference"] == theirs["reference"]).all()


def test_served_vlm_shows_probabilities_and_its_answer(vlm, monkeypatch):
    from medlava.serve.app import create_app
    from medlava.tools.predict import load_predictor

    monkeypatch.setenv("MEDLAVA_CACHE", vlm["env"]["MEDLAVA_CACHE"])
    predictor = load_predictor(vlm["sft"], torch.device("cpu"))
    client = create_app(predictor).test_client()
    page = client.get("/").get_data(as_text=True)
    assert 'id="question"' in page and 'id="age"' not in page and "LLaVA (lora checkpoint" in page

    sample = vlm["samples"][0]
    image = vlm["tmp"] / "ham" / sample["image"]
    question = "Describe the lesion."
    r = client.post(
        "/predict",
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(image.read_bytes()), "x.jpg", "image/jpeg"), "question": question},
    )
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    item = Item("x", image.parent, image.name, {})
    np.testing.assert_allclose([p for _, p in body["probabilities"]], predictor.probabilities([item])[0], atol=1e-6)
    assert body["question"] == question and body["answer"] == predictor.answer(item, question)
    infer = pd.read_csv(vlm["infer"] / "predictions.csv", keep_default_na=False).set_index("id")
    assert body["prediction"] == infer.loc[sample["id"], "prediction"]
    default = client.post(
        "/predict",
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(image.read_bytes()), "x.jpg", "image/jpeg")},
    ).get_json()
    assert default["question"] == QUESTION


@pytest.mark.parametrize(
    "rows, needle",
    [
        ("image,age\na.jpg,forty\n", "in.csv:2: age 'forty' is not a number; write a number or leave it empty"),
        ("image,dx\na.jpg,nv\nb.jpg,melanoma\n", "in.csv:3: dx 'melanoma' is not one of the model's classes"),
        ("path,age\na.jpg,40\n", "in.csv: needs an `image` column (path inside"),
        ("image_id\nISIC_1\n", "in.csv:2: image ISIC_1 not found under"),
        ("image,id\na.jpg,x\nb.jpg,x\n", "in.csv: id(s) ['x'] name more than one image; ids must be unique"),
        ("image,age\n,40\n", "in.csv:2: no image given; fill `image` or `image_id`"),
    ],
)
def test_bad_csv_rows_are_named(tmp_path, rows, needle):
    (tmp_path / "in.csv").write_text(rows)
    with pytest.raises(InputError) as e:
        read_csv(tmp_path / "in.csv", None, CLASSES)
    assert needle in str(e.value)


def test_csv_and_folder_inputs(tmp_path):
    (tmp_path / "HAM10000_images_part_2").mkdir()
    for rel in ("HAM10000_images_part_2/ISIC_7.jpg", "b.png", "notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "in.csv").write_text("image_id,age,sex,localization,dx\nISIC_7,,male,back,mel\n")
    [item] = read_csv(tmp_path / "in.csv", None, CLASSES)
    assert (item.id, item.rel, item.meta, item.label) == (
        "ISIC_7",
        "HAM10000_images_part_2/ISIC_7.jpg",
        {"sex": "male", "localization": "back"},
        CLASSES.index("mel"),
    )
    assert [(it.id, it.rel) for it in read_folder(tmp_path)] == [
        ("HAM10000_images_part_2/ISIC_7", "HAM10000_images_part_2/ISIC_7.jpg"),
        ("b", "b.png"),
    ]
    (tmp_path / "out.csv").write_text("image\n../../etc/passwd\n")
    [outside] = read_csv(tmp_path / "out.csv", None, CLASSES)
    with pytest.raises(InputError, match="is not a file inside the image root"):
        _ = outside.path
