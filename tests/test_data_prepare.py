"""What all adapters share: `medlava prepare --check` lists every problem in one pass, the CLI shows a message
and never a traceback for bad data, the dataset options are checked in the config, and the fast image path
computes what the processor computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from medlava.cli import main
from medlava.config import ConfigError, load_config
from medlava.data.ham10000 import METADATA as HAM_METADATA
from medlava.data.images import pixel_values
from medlava.data.mimic_cxr import CHEXPERT, METADATA, image_path, report_path
from medlava.data.synthetic import make_synthetic_ham10000
from medlava.data.synthetic_benchmarks import make_synthetic_slake
from PIL import Image
from synthetic.mimic import make_synthetic_mimic
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil


def cli(tmp: Path, *args: str) -> int:
    return main(["prepare", "--config", str(TINY), "data.synthetic=null", f"output_root={tmp / 'runs'}", *args])


@pytest.fixture
def broken_mimic(tmp_path) -> tuple[Path, list[tuple[str, str]]]:
    """A MIMIC-CXR copy with five different problems; returns root and (reason, where) of each."""
    root = make_synthetic_mimic(tmp_path / "mimic")
    meta = pd.read_csv(root / METADATA, dtype=str)
    frontal = meta[meta["ViewPosition"].isin(["PA", "AP"])].drop_duplicates("study_id")
    (a, b, c, d) = frontal.head(4)[["subject_id", "study_id", "dicom_id"]].to_numpy()
    (root / image_path("official", *a)).unlink()
    (root / image_path("official", *b)).write_bytes(b"\xff\xd8\xff\xe0 broken jpeg")
    (root / report_path(*c[:2])).write_text("\n")
    (root / report_path(*d[:2])).write_bytes(b"FINDINGS: caf\xe9\nIMPRESSION: ok")
    labels = pd.read_csv(root / CHEXPERT, dtype=str)
    labels.loc[0, "Edema"] = "maybe"
    labels.to_csv(root / CHEXPERT, index=False)
    return root, [
        ("missing_image", a[2]),
        ("unreadable_image", b[2]),
        ("empty_report", f"s{c[1]}.txt"),
        ("non_utf8", f"s{d[1]}.txt"),
        ("unknown_label", f"{CHEXPERT}:2"),
    ]


def test_check_lists_every_problem_in_one_pass(broken_mimic, tmp_path, capsys):
    root, planted = broken_mimic
    code = cli(
        tmp_path,
        "--check",
        "data.dataset=mimic_cxr",
        f"data.root={root}",
        "data.mimic_cxr.section=impression",
        "run_id=c1",
    )
    out = capsys.readouterr().out
    assert (
        code == 1
        and "5 problem(s): empty_report 1, missing_image 1, non_utf8 1, unknown_label 1, unreadable_image 1" in out
    )
    run = tmp_path / "runs" / "tiny" / "prepare" / "c1"
    report = json.loads((run / "prepare_report.json").read_text())
    assert not report["ok"] and report["mode"] == "check"
    assert sorted(
        (e["reason"], next(w for r, w in planted if r == e["reason"]) in e["where"] + e["message"])
        for e in report["errors"]
    ) == sorted((r, True) for r, _ in planted)
    for _, where in planted:
        assert where in out
    assert not (run / "train.jsonl").exists() and not (run / "COMPLETE.json").exists()  # a check writes no samples
    # the same problems, allowed to be skipped: the check passes and says what would be skipped
    skip = "data.skip=[missing_image,unreadable_image,empty_report,non_utf8,unknown_label]"
    assert (
        cli(
            tmp_path,
            "--check",
            "data.dataset=mimic_cxr",
            f"data.root={root}",
            "data.mimic_cxr.section=impression",
            skip,
            "run_id=c2",
        )
        == 0
    )
    assert "no problems" in capsys.readouterr().out


def test_check_goes_on_past_an_unreadable_file(tmp_path, capsys):
    root = make_synthetic_slake(tmp_path / "slake")
    (root / "train.json").write_text('[{"qid": 1,\n "img_name": ')
    test = json.loads((root / "test.json").read_text())
    test[0]["answer_type"] = "MAYBE"
    (root / "test.json").write_text(json.dumps(test))
    (root / "imgs" / test[5]["img_name"]).write_bytes(b"")
    assert cli(tmp_path, "--check", "data.dataset=slake", f"data.root={root}", "run_id=s") == 1
    report = json.loads((tmp_path / "runs" / "tiny" / "prepare" / "s" / "prepare_report.json").read_text())
    assert report["error_counts"] == {"structure": 1, "unknown_label": 1, "unreadable_image": 1}
    assert f"{root}/train.json:2: not valid JSON" in capsys.readouterr().out


def test_ham10000_check_reports_all_bad_rows(tmp_path, capsys):
    root = make_synthetic_ham10000(tmp_path / "ham", n_lesions=14, max_images_per_lesion=1)
    meta = pd.read_csv(root / HAM_METADATA, dtype=str)
    meta.loc[2, "dx"] = "melanoma"
    meta.loc[5, "age"] = "old"
    meta = pd.concat([meta, meta.iloc[[7]]], ignore_index=True)
    meta.to_csv(root / HAM_METADATA, index=False)
    next(root.glob(f"HAM10000_images_part_*/{meta.loc[9, 'image_id']}.jpg")).unlink()
    assert cli(tmp_path, "--check", f"data.root={root}", "run_id=h") == 1
    out = capsys.readouterr().out
    assert "4 problem(s): bad_record 1, duplicate_id 1, missing_image 1, unknown_label 1" in out
    assert f"{HAM_METADATA}:4: unknown dx 'melanoma'" in out and f"{HAM_METADATA}:7: age 'old'" in out


def test_check_refuses_an_image_whose_padded_square_is_too_large(tmp_path, capsys):
    """60000x1 is within the pixel count, but LLaVA's pad aspect would make it a 60000^2 square (10 GB)."""
    import resource

    root = make_synthetic_ham10000(tmp_path / "ham", n_lesions=14, max_images_per_lesion=1)
    wide = sorted(root.glob("HAM10000_images_part_*/*.jpg"))[3]
    Image.new("RGB", (60000, 1)).save(wide, "JPEG")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert cli(tmp_path, "--check", f"data.root={root}", "run_id=w") == 1
    out = capsys.readouterr().out
    assert "1 problem(s): oversized_image 1" in out
    assert (
        f"{wide} is 60000x1: padded to a square it would be 60000x60000 = 3,600,000,000 pixels, over the "
        "67,108,864-pixel limit (the longest side may be at most 8192); downscale it"
    ) in out
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # kB: nothing padded


def test_a_finished_run_directory_is_not_started_again(tmp_path, capsys):
    """Two launches sharing a run_id must not share (and overwrite) one directory; an unfinished one (a check,
    a killed or requeued job) is continued."""
    root = make_synthetic_ham10000(tmp_path / "ham", n_lesions=14, max_images_per_lesion=1)
    assert cli(tmp_path, "--check", f"data.root={root}", "run_id=same") == 0
    assert cli(tmp_path, f"data.root={root}", "run_id=same") == 0
    run = tmp_path / "runs" / "tiny" / "prepare" / "same"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli(tmp_path, f"data.root={root}", "data.split_ratios=[0.5,0.25,0.25]", "run_id=same") == 2
    started = json.loads((run / "run.json").read_text())["started"]
    assert (
        f"medlava prepare: {run} already holds a complete prepare run (started {started}), and a finished run is "
        "never rewritten: choose another run_id, or leave it unset for a new one"
    ) in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_bad_data_is_a_message_not_a_traceback(broken_mimic, tmp_path, capsys):
    root, _ = broken_mimic
    code = cli(tmp_path, "data.dataset=mimic_cxr", f"data.root={root}", "data.mimic_cxr.section=impression", "run_id=x")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("medlava prepare: ") and "Traceback" not in err
    assert "add unknown_label to data.skip" in err
    assert main(["sft", "--config", str(TINY), "--check"]) == 2
    assert "--check is an option of prepare, not sft" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["data.dataset=slake", "data.mimic_cxr.section=impression"],
            "data.mimic_cxr is set but data.dataset is slake; set data.dataset=mimic_cxr or remove data.mimic_cxr",
        ),
        (["data.dataset=slake", "data.synthetic={n_lesions: 20}"], "data.synthetic generates HAM10000 only"),
        (
            ["data.dataset=mimic_cxr", "data.split_file=s.csv"],
            "data.split_file is set but mimic_cxr uses its official split; remove it or set "
            "data.mimic_cxr.split=grouped",
        ),
        (["data.dataset=llava_med", "data.llava_med.eval_file=q.jsonl"], "data.llava_med.eval_file is the test split"),
        (
            ["data.dataset=chexpert_plus", "data.chexpert_plus.generator=llm"],
            "data.chexpert_plus.generator=llm needs data.chexpert_plus.llm",
        ),
        (["data.skip=[missing_images]"], "data.skip.0: Input should be 'missing_image'"),
        (["data.slake.mask=blur", "data.dataset=slake"], "data.slake.mask: Input should be 'none', 'crop' or 'masked'"),
    ],
)
def test_dataset_options_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.synthetic=null", *overrides])
    assert needle in str(e.value)


def test_every_skip_reason_is_a_config_choice():
    from typing import get_args

    from medlava.config import SkipReason
    from medlava.data.problems import REASONS

    assert set(get_args(SkipReason)) == set(REASONS)


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("size", [(600, 450), (450, 600), (336, 336), (90, 120), (601, 449)])
def test_fast_pixel_values_match_the_processors(pad, size):
    processor = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=pad)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    got = pixel_values(image, processor)
    assert got.shape == expected.shape == (3, 336, 336)
    # torch's uint8 resize may round a pixel to the neighbouring 8-bit level; nothing more, and rarely
    level = (1 / 255 / torch.tensor(processor.image_std)).view(3, 1, 1)
    off = (got - expected).abs() > 1e-5
    assert ((got - expected).abs() <= level + 1e-5).all() and off.float().mean() < 0.02


def test_fast_pixel_values_defer_to_a_processor_they_do_not_model():
    processor = LlavaImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=Image.Resampling.LANCZOS
    )
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pixel_values(image, processor), expected)


def test_slake_check_with_masks_writes_nothing(tmp_path):
    root = make_synthetic_slake(tmp_path / "slake")
    shutil.rmtree(root / "imgs" / "xmlab3")
    assert cli(tmp_path, "--check", "data.dataset=slake", f"data.root={root}", "data.slake.mask=crop", "run_id=m") == 1
    run = tmp_path / "runs" / "tiny" / "prepare" / "m"
    report = json.loads((run / "prepare_report.json").read_text())
    assert report["error_counts"] == {"missing_image": 1} and not (run / "images").exists()


def test_recipes_carry_the_seed_settings():
    configs = TINY.parent
    align = load_config(configs / "llava_med_align.yaml")
    assert (align.data.dataset, align.data.llava_med.train_file) == ("llava_med", "llava_med_alignment_500k.json")
    assert (align.align.lr, align.align.global_batch_size, align.align.grad_accum) == (2e-3, 128, 1)
    sft = load_config(configs / "llava_med_sft.yaml")
    assert (
        (sft.data.llava_med.train_file, sft.sft.lr, sft.sft.epochs, sft.sft.grad_accum)
        == ("llava_med_instruct_60k.json", 2e-5, 3, 2)
        and sft.sft.train_llm
        and sft.sft.lora is None
    )
    cxp = load_config(configs / "chexpert_plus_lora.yaml")
    assert (cxp.model.name_or_path, cxp.model.template, cxp.sft.lora.r, cxp.sft.lora.alpha) == (
        "llava-hf/llava-1.5-7b-hf",
        "vicuna_v1",
        64,
        16,
    ) and cxp.data.chexpert_plus.qa_per_report == 5
    slake = load_config(configs / "slake_lora.yaml")
    assert slake.data.dataset == "slake" and slake.data.slake.language == "en" and slake.eval.family == "vqa"
    mimic = load_config(configs / "mimic_cxr_report_sft.yaml")
    assert (mimic.data.mimic_cxr.section, mimic.data.mimic_cxr.views, mimic.infer.mode, mimic.eval.family) == (
        "findings",
        ["PA", "AP"],
        "generate",
        "report",
    )


def test_a_non_utf8_csv_row_is_its_own_problem(tmp_path):
    from medlava.data.problems import Problems, read_csv
    from medlava.io import InputError

    csv = tmp_path / "t.csv"
    csv.write_bytes(b"id,text\na,fine\nb,caf\xe9\n\nc,ok\n")
    with pytest.raises(InputError, match=rf"{csv}:3: text is not UTF-8 .*add non_utf8 to data.skip"):
        read_csv(csv, Problems(), ("id", "text"))
    problems = Problems(skip={"non_utf8"})
    df = read_csv(csv, problems, ("id", "text"))
    assert df["id"].tolist() == ["a", "c"] and df.index.tolist() == [2, 5]  # index = line numbers
    assert problems.skipped == {"non_utf8": 1}
    with pytest.raises(InputError, match=r"missing columns \['label'\]; expected id,label"):
        read_csv(csv, Problems(), ("id", "label"))


def test_check_report_prints_the_first_200_and_keeps_them_all():
    from medlava.data.problems import Problems

    problems = Problems(check=True)
    for i in range(250):
        problems.add("missing_image", f"f.json record {i}", "gone")
    text = problems.render().splitlines()
    assert text[0] == "250 problem(s): missing_image 250" and len(text) == 1 + 200 + 1
    assert text[-1] == "  ... and 50 more (prepare_report.json lists 250)" and len(problems.report()["errors"]) == 250
