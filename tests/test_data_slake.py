"""SLAKE: local release layout and the Hugging Face layout, English filter, OPEN/CLOSED, closed choices,
KG in the prompt, mask conditioning with its debug images, and bad records."""

from __future__ import annotations

import itertools
import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import prepare_dataset, rows
from medlava.data.benchmark import closed_choices
from medlava.data.synthetic_benchmarks import make_synthetic_slake, make_synthetic_slake_hf, slake_records
from medlava.io import InputError
from PIL import Image

prepare = partial(prepare_dataset, "slake")


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    return make_synthetic_slake(tmp_path_factory.mktemp("slake") / "SLAKE")


def test_local_layout_english_samples_with_vqa_meta(local, tmp_path):
    run = prepare(tmp_path, local)
    out = rows(run)
    records = slake_records()
    en = {s: [r for r in records[s] if r["q_lang"] == "en"] for s in records}
    # 12 images (6/3/3 by split) x 5 English questions; the Chinese ones are filtered out
    assert {s: len(v) for s, v in out.items()} == {"train": 30, "val": 15, "test": 15}
    assert {s: sorted(r["id"] for r in v) for s, v in out.items()} == {
        s: sorted(str(r["qid"]) for r in en[k]) for s, k in (("train", "train"), ("val", "validate"), ("test", "test"))
    }
    images = [{r["meta"]["group"] for r in v} for v in out.values()]
    assert not any(a & b for a, b in itertools.combinations(images, 2))  # no image in two splits
    by_id = {str(r["qid"]): r for rs in records.values() for r in rs}
    for split, rs in out.items():
        for r in rs:
            src = by_id[r["id"]]
            assert r["image"] == src["img_name"] and (local / "imgs" / r["image"]).is_file()
            assert r["conversations"][0]["value"] == "<image>\n" + src["question"]
            m = r["meta"]
            assert (m["dataset"], m["split"], m["task"]) == ("slake", split, src["answer_type"].lower())
            assert {
                k: m[k] for k in ("answer_type", "content_type", "modality", "location", "base_type", "q_lang")
            } == {k: src[k] for k in ("answer_type", "content_type", "modality", "location", "base_type", "q_lang")}
    closed = [r for rs in out.values() for r in rs if r["meta"]["task"] == "closed"]
    yes_no = [r for r in closed if r["meta"].get("choices") == ["yes", "no"]]
    either = [r for r in closed if r["meta"].get("choices") not in (None, ["yes", "no"])]
    assert len(yes_no) == len(either) == 12 and len(closed) == 36  # "Where is the abnormality?" has no evident choices
    assert all(r["conversations"][1]["value"] == r["meta"]["answer"] in ("yes", "no") for r in yes_no)
    assert all(r["meta"]["answer"] in r["meta"]["choices"] for r in either)
    summary = json.loads((run / "dataset.json").read_text())
    assert summary["stats"] == {
        "closed_with_choices": 24,
        "closed_without_choices": 12,
        "other_language": 12,
        "with_knowledge": 0,
    }
    assert (
        prepare(tmp_path, local, "data.slake.language=all", run_id="all")
        and sum(len(v) for v in rows(tmp_path / "runs" / "tiny" / "prepare" / "all").values()) == 72
    )


def test_hf_layouts_give_the_same_samples(local, tmp_path):
    disk = make_synthetic_slake_hf(tmp_path / "hf")  # datasets' save_to_disk output
    assert (disk / "dataset_dict.json").is_file() and not (disk / "train.json").exists()
    hub = make_synthetic_slake(tmp_path / "hub", val_name="validation.json")  # the hub repo's data files
    expected = rows(prepare(tmp_path, local, run_id="local"))
    for root in (disk, hub):
        assert rows(prepare(tmp_path, root, "data.slake.source=hf", run_id=root.name)) == expected


def test_closed_choices_only_where_evident():
    assert closed_choices("Is this a CT?", "Yes") == (["yes", "no"], "yes")
    assert closed_choices("Which is bigger, Liver or spleen?", "liver") == (["Liver", "spleen"], "Liver")
    assert closed_choices("Which is bigger, liver or spleen?", "Heart") is None
    assert closed_choices("Where is the abnormality?", "Left") is None


def test_kg_in_the_prompt(local, tmp_path):
    facts = rows(prepare(tmp_path, local, "data.slake.kg=facts", run_id="facts"))
    kvqa = [r for rs in facts.values() for r in rs if r["meta"]["base_type"] == "kvqa"]
    assert len(kvqa) == 12
    for r in kvqa:
        organ = r["conversations"][0]["value"].split("function of the ")[1].split()[0].capitalize()
        assert r["conversations"][0]["value"].startswith(f"<image>\nKnowledge: {organ} function: ")
        assert r["conversations"][1]["value"] in r["conversations"][0]["value"]  # the fact holds the answer
    vqa = [r for rs in facts.values() for r in rs if r["meta"]["base_type"] == "vqa"]
    assert not any("Knowledge" in r["conversations"][0]["value"] for r in vqa)
    triple = rows(
        prepare(tmp_path, local, "data.slake.kg=triple", "data.slake.instruction=Answer briefly.", run_id="triple")
    )
    r = next(r for rs in triple.values() for r in rs if r["meta"]["base_type"] == "kvqa")
    assert r["conversations"][0]["value"].startswith("<image>\nKnowledge: (vhead, function, _)\nWhat is the function")
    assert r["conversations"][0]["value"].endswith("? Answer briefly.")


@pytest.mark.parametrize("mode", ["crop", "masked"])
def test_mask_conditioning_writes_what_the_model_sees(local, tmp_path, mode):
    run = prepare(tmp_path, local, f"data.slake.mask={mode}", "data.slake.debug_images=3", run_id=mode)
    summary = json.loads((run / "dataset.json").read_text())
    assert summary["image_root"] == str((run / "images").resolve()) and summary["stats"]["masked_images"] == 12
    r = rows(run)["train"][0]
    assert r["image"] == f"{Path(r['meta']['img_name']).parent}/{mode}.png"
    seen = np.asarray(Image.open(run / "images" / r["image"]))
    source = np.asarray(Image.open(local / "imgs" / r["meta"]["img_name"]))
    mask = np.asarray(Image.open(local / "imgs" / Path(r["meta"]["img_name"]).parent / "mask.png")) > 0
    ys, xs = np.nonzero(mask)
    if mode == "crop":  # the mask's box plus 5% each side
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert seen.shape[:2] == pytest.approx((h * 1.1, w * 1.1), abs=2)
    else:
        assert seen.shape == source.shape and (seen[~mask] == 0).all() and (seen[mask] == source[mask]).all()
    debug = sorted((run / "debug").iterdir())
    assert len(debug) == 3 and Image.open(debug[0]).size == (3 * 336, 336)


def test_bad_records_are_errors_or_counted_skips(local, tmp_path):
    root = Path(shutil.copytree(local, tmp_path / "bad"))
    train = json.loads((root / "train.json").read_text())
    train[0]["answer_type"] = "MAYBE"
    del train[1]["question"]
    (root / "train.json").write_text(json.dumps(train))
    (root / "imgs" / "xmlab2" / "mask.png").unlink()
    with pytest.raises(InputError, match=rf"{root}/train.json record 0: q_lang 'en' / answer_type 'MAYBE'"):
        prepare(tmp_path, root, run_id="a")
    run = prepare(
        tmp_path, root, "data.skip=[unknown_label,bad_record,missing_image]", "data.slake.mask=crop", run_id="b"
    )
    report = json.loads((run / "prepare_report.json").read_text())
    # xmlab2 has 5 English questions but its mask is gone: counted once per question
    assert {k: v for k, v in report["skipped"].items() if v} == {
        "unknown_label": 1,
        "bad_record": 1,
        "missing_image": 5,
    }
    assert sum(report["splits"].values()) == 60 - 2 - 5
    (root / "test.json").write_text('[{"qid": 1,')
    with pytest.raises(InputError, match=rf"{root}/test.json:1: not valid JSON"):
        prepare(tmp_path, root, "data.skip=[unknown_label,bad_record]", run_id="c")
