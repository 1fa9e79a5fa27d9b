"""The medical VQA benchmark adapters on tiny copies written in each release's own layout
(tests/synthetic/benchmarks.py): sample counts, published splits, tasks, options and answers, images (files,
parquet-embedded, several combined), and bad rows named by file and row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, prepare_dataset, rows
from medlava.config import load_config
from medlava.data.benchmark import MC_INSTRUCTION, side_by_side
from medlava.data.synthetic_benchmarks import (
    make_hf_vqa,
    make_medxpertqa,
    make_mmmu,
    make_omnimedvqa,
    make_pmc_vqa,
    make_vqa_rad_osf,
)
from medlava.io import InputError
from medlava.stages import CheckFailed
from medlava.stages.prepare import run as run_prepare
from PIL import Image

SUBJECTS = "data.mmmu_med.subjects=[Clinical_Medicine,Pharmacy]"


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("releases")
    return {
        "root": root,
        "vqa_rad": make_vqa_rad_osf(root / "VQA_RAD"),
        "vqa_rad_hf": make_hf_vqa(root / "vqa-rad", {"train": 6, "test": 6}),
        "path_vqa": make_hf_vqa(root / "path-vqa", {"train": 6, "validation": 4, "test": 5}, seed=7),
        "pmc_vqa": make_pmc_vqa(root / "PMC-VQA"),
        "pmc_vqa_2": make_pmc_vqa(root / "PMC-VQA-2", version=2),
        "omnimedvqa": make_omnimedvqa(root / "OmniMedVQA"),
        "medxpertqa": make_medxpertqa(root / "MedXpertQA"),
        "mmmu": make_mmmu(root / "MMMU"),
    }


def _all(run: Path) -> dict[str, dict]:
    return {r["id"]: r for rs in rows(run).values() for r in rs}


def test_vqa_rad_osf_release(releases, tmp_path):
    out = rows(prepare_dataset("vqa_rad", tmp_path, releases["root"] / "VQA_RAD"))
    records = releases["vqa_rad"]["records"]
    assert {s: len(v) for s, v in out.items()} == {"train": 18, "val": 0, "test": 6}
    assert sorted(r["id"] for r in out["test"]) == sorted(
        str(r["qid"]) for r in records if r["phrase_type"].startswith("test")
    )
    by_id = {str(r["qid"]): r for r in records}
    for split, rs in out.items():
        for r in rs:
            src = by_id[r["id"]]
            m = r["meta"]
            assert (m["split"], m["task"], m["answer_type"]) == (split, src["answer_type"].lower(), src["answer_type"])
            assert r["image"] == src["image_name"] and r["conversations"][0]["value"] == "<image>\n" + src["question"]
            assert (m["question_type"], m["phrase_type"], m["image_organ"]) == (
                src["question_type"],
                src["phrase_type"],
                "CHEST",
            )
    closed = {
        r["conversations"][0]["value"].split("\n")[1]: r["meta"]
        for rs in out.values()
        for r in rs
        if r["meta"]["task"] == "closed"
    }
    assert closed["Is there a pleural effusion?"]["choices"] == ["yes", "no"]
    assert closed["Which side is the lesion on, left or right?"]["choices"] == ["left", "right"]
    assert "choices" not in closed["Is this a CT or an MRI?"]  # no comma before "X or Y": generated, scored as text
    counts = next(r for r in out["train"] if r["conversations"][0]["value"].endswith("How many lesions are there?"))
    assert counts["meta"]["answer"] == "2" and counts["conversations"][1]["value"] == "2"  # a JSON number answer


def test_vqa_rad_and_path_vqa_parquet_copies(releases, tmp_path):
    run = prepare_dataset("vqa_rad", tmp_path, releases["root"] / "vqa-rad", "data.vqa_rad.source=hf")
    out = rows(run)
    assert {s: len(v) for s, v in out.items()} == {"train": 6, "val": 0, "test": 6}
    for split, rs in out.items():
        src = releases["vqa_rad_hf"].get(split, [])
        for i, r in enumerate(rs):
            assert r["id"] == f"{split}-{i}" and r["meta"]["answer"].lower() == src[i]["answer"]
            assert r["meta"]["task"] == ("closed" if src[i]["answer"] in ("yes", "no") else "open")
            # the embedded bytes written out unchanged, once per distinct image
            assert (run / "images" / r["image"]).read_bytes() == src[i]["image"]["bytes"]
    assert len(list((run / "images").rglob("*.jpg"))) == len(
        {r["image"]["bytes"] for s in releases["vqa_rad_hf"].values() for r in s}
    )
    summary = json.loads((run / "dataset.json").read_text())
    assert summary["image_root"] == str((run / "images").resolve()) and summary["closed"] == "yes/no answers"
    path = rows(prepare_dataset("path_vqa", tmp_path, releases["root"] / "path-vqa", run_id="p"))
    assert {s: len(v) for s, v in path.items()} == {"train": 6, "val": 4, "test": 5}  # validation -> val


@pytest.mark.parametrize("version", [1, 2])
def test_pmc_vqa_csvs(releases, tmp_path, version):
    files = ["data.pmc_vqa.train_file=train_2.csv", "data.pmc_vqa.test_file=test_2.csv"] if version == 2 else []
    root = releases["root"] / ("PMC-VQA" if version == 1 else "PMC-VQA-2")
    out = rows(prepare_dataset("pmc_vqa", tmp_path, root, *files))
    assert {s: len(v) for s, v in out.items()} == {"train": 8, "val": 0, "test": 8}
    src = releases["pmc_vqa" if version == 1 else "pmc_vqa_2"]
    for split, rs in out.items():
        for i, r in enumerate(rs):
            want = src[split][i]
            m = r["meta"]
            assert r["id"] == f"{split}-{i + 1}" and r["image"] == want["Figure_path"]
            assert (
                m["task"] == "multiple_choice" and m["choices"] == list("ABCD") and m["answer"] == want["Answer_label"]
            )
            assert m["options"]["B"] == want["Choice B"].strip()[2:]  # the "B:" prefix (and its space) taken off
            assert r["conversations"] == [
                {
                    "from": "human",
                    "value": "<image>\n"
                    + "\n".join([want["Question"], *(f"{k}. {v}" for k, v in m["options"].items()), MC_INSTRUCTION]),
                },
                {"from": "gpt", "value": want["Answer_label"]},
            ]


def test_pmc_vqa_test_file_choice_and_bad_label(releases, tmp_path):
    root = Path(shutil.copytree(releases["root"] / "PMC-VQA", tmp_path / "pmc"))
    text = (root / "test_clean.csv").read_text().splitlines()
    (root / "test_clean.csv").write_text("\n".join(text[:3] + [text[3].rsplit(",", 1)[0] + ",Z"] + text[4:]) + "\n")
    with pytest.raises(InputError, match=r"test_clean.csv row 3: answer label 'Z'"):
        prepare_dataset("pmc_vqa", tmp_path, root)
    out = rows(
        prepare_dataset(
            "pmc_vqa", tmp_path, root, "data.skip=[unknown_label]", "data.pmc_vqa.train_file=null", run_id="skip"
        )
    )
    assert {s: len(v) for s, v in out.items()} == {"train": 0, "val": 0, "test": 7}


def test_omnimedvqa_open_access_and_options(releases, tmp_path):
    out = rows(prepare_dataset("omnimedvqa", tmp_path, releases["root"] / "OmniMedVQA"))
    assert {s: len(v) for s, v in out.items()} == {"train": 0, "val": 0, "test": 8}  # Open-access only, all test
    src = {r["question_id"]: r for recs in releases["omnimedvqa"].values() for r in recs}
    for r in out["test"]:
        want, m = src[r["id"]], r["meta"]
        n = sum(f"option_{k}" in want for k in "ABCD")
        assert m["choices"] == list("ABCD")[:n] and m["options"][m["answer"]] == want["gt_answer"]
        assert r["image"] == want["image_path"] and m["source_dataset"] == want["dataset"]
        assert m["modality_type"] == want.get("modality_type", want.get("modality"))  # one file writes `modality`
    with pytest.raises(InputError, match="RUS_CHN/000.png"):  # Restricted-access ships no images
        prepare_dataset(
            "omnimedvqa", tmp_path, releases["root"] / "OmniMedVQA", "data.omnimedvqa.access=all", run_id="all"
        )


def test_medxpertqa_multi_image_questions(releases, tmp_path):
    run = prepare_dataset("medxpertqa", tmp_path, releases["root"] / "MedXpertQA")
    out = rows(run)
    assert {s: len(v) for s, v in out.items()} == {"train": 0, "val": 2, "test": 6}  # dev -> val
    src = {r["id"]: r for rs in releases["medxpertqa"].values() for r in rs}
    images = releases["root"] / "MedXpertQA" / "images"
    for r in out["test"] + out["val"]:
        want, m = src[r["id"]], r["meta"]
        assert m["choices"] == list("ABCDE") and m["answer"] == want["label"] and m["n_images"] == len(want["images"])
        prompt = r["conversations"][0]["value"]
        assert prompt.count("(A) choice a") == 1 and "\nA. " not in prompt  # the released listing, not a second one
        seen = Image.open(run / "images" / r["image"])
        if len(want["images"]) == 1:
            assert r["image"] == f"linked/{want['images'][0]}" and seen.size == (40, 32)
        else:  # side by side, 8-pixel gaps
            assert seen.size == (40 * len(want["images"]) + 8 * (len(want["images"]) - 1), 32)
            first = np.asarray(Image.open(images / want["images"][0]).convert("RGB"))
            assert np.array_equal(np.asarray(seen)[:, :40], first)
    first = rows(
        prepare_dataset(
            "medxpertqa", tmp_path, releases["root"] / "MedXpertQA", "data.medxpertqa.images=first", run_id="first"
        )
    )
    assert all(r["image"].startswith("linked/") for r in first["test"])


def test_mmmu_medical_subjects(releases, tmp_path):
    run = prepare_dataset("mmmu_med", tmp_path, releases["root"] / "MMMU", SUBJECTS)
    out = rows(run)
    assert {s: len(v) for s, v in out.items()} == {"train": 4, "val": 12, "test": 0}  # test answers are "?"
    summary = json.loads((run / "dataset.json").read_text())
    assert summary["stats"]["test_answer_not_released"] == 4
    src = {r["id"]: r for rs in releases["mmmu"].values() for r in rs}
    for r in out["val"]:
        want, m = src[r["id"]], r["meta"]
        prompt = r["conversations"][0]["value"]
        assert m["subject"] in ("Clinical_Medicine", "Pharmacy") and m["question_type"] == want["question_type"]
        assert "<image 1>" in prompt  # MMMU's placeholders stay in the text
        if want["question_type"] == "open":
            assert m["task"] == "open" and m["answer"] == "2"
            assert prompt == f"<image>\n{want['question']}\n\nAnswer the question using a single word or phrase."
            continue
        options = eval(want["options"])  # noqa: S307 (the test's own data)
        assert (
            m["task"] == "multiple_choice" and list(m["options"].values()) == options and m["answer"] == want["answer"]
        )
        listing = "".join(f"({k}) {o}\n" for k, o in zip("ABCDE", options))
        assert prompt == f"<image>\n{want['question']}\n\n{listing}\n\n{MC_INSTRUCTION}"
        # image_1 only, as MMMU's run_llava.py does
        assert (run / "images" / r["image"]).read_bytes() == want["image_1"]["bytes"]
    two = next(r for r in out["val"] if src[r["id"]]["image_2"])
    both = rows(
        prepare_dataset(
            "mmmu_med", tmp_path, releases["root"] / "MMMU", SUBJECTS, "data.mmmu_med.images=all", run_id="all"
        )
    )
    combined = next(r for r in both["val"] if r["id"] == two["id"])
    assert combined["image"] == f"combined/{two['id']}.png"


def test_mmmu_bad_row_named_by_file_and_row(releases, tmp_path):
    import pandas as pd

    root = Path(shutil.copytree(releases["root"] / "MMMU", tmp_path / "mmmu"))
    path = root / "Pharmacy" / "validation-00000-of-00001.parquet"
    df = pd.read_parquet(path)
    df.loc[2, "answer"] = "Q"
    df.to_parquet(path)
    with pytest.raises(
        InputError,
        match=r"Pharmacy/validation-00000-of-00001.parquet row 2: answer 'Q' is not an "
        "option letter",
    ):
        prepare_dataset("mmmu_med", tmp_path, root, SUBJECTS)


def test_check_lists_every_bad_row_of_a_release(releases, tmp_path):
    root = Path(shutil.copytree(releases["root"] / "OmniMedVQA", tmp_path / "omni"))
    path = root / "QA_information" / "Open-access" / "ACRIMA.json"
    recs = json.loads(path.read_text())
    recs[0]["gt_answer"], recs[1]["question"] = "not an option", ""
    path.write_text(json.dumps(recs))
    (root / "Images" / "ACRIMA" / "002.png").unlink()
    cfg = load_config(
        TINY,
        [
            "data.dataset=omnimedvqa",
            "data.synthetic=null",
            f"data.root={root}",
            f"output_root={tmp_path / 'runs'}",
            "run_id=check",
        ],
    )
    with pytest.raises(CheckFailed) as failed:
        run_prepare(cfg, check=True)
    report = json.loads(Path(str(failed.value)).read_text())
    assert report["error_counts"] == {"bad_record": 1, "missing_image": 1, "unknown_label": 1}
    wheres = sorted(e["where"] for e in report["errors"])
    assert wheres == [f"{path} record 0", f"{path} record 1", f"{path} record 2"]


def test_side_by_side_scales_to_one_height():
    a, b = Image.new("RGB", (10, 20), (255, 0, 0)), Image.new("RGB", (30, 10), (0, 255, 0))
    out = side_by_side([a, b])
    assert out.size == (10 + 8 + 60, 20)
    assert (
        out.getpixel((0, 0)) == (255, 0, 0)
        and out.getpixel((14, 5)) == (0, 0, 0)
        and out.getpixel((20, 5)) == (0, 255, 0)
    )
