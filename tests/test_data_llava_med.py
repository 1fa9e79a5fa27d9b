"""LLaVA-Med alignment / instruct JSON and the qa50 question file read as released, split by PMC article; and every
kind of bad input (on this layout, which has JSON, JSONL and images): the error naming file and line or record,
or the skip counted by reason."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import zlib
from functools import partial
from pathlib import Path

import pytest
from conftest import prepare_dataset, rows
from medlava.io import InputError
from synthetic.llava_med import ALIGNMENT, INSTRUCT, QA50, make_synthetic_llava_med

prepare = partial(prepare_dataset, "llava_med")


@pytest.fixture(scope="module")
def med(tmp_path_factory) -> Path:
    return make_synthetic_llava_med(tmp_path_factory.mktemp("med") / "llava-med")


def test_alignment_file_as_released(med, tmp_path):
    out = rows(prepare(tmp_path, med, f"data.llava_med.train_file={ALIGNMENT}", "data.split_ratios=[1,0,0]"))
    source = json.loads((med / ALIGNMENT).read_text())
    assert [len(v) for v in out.values()] == [20, 0, 0]
    assert [(r["id"], r["image"], r["conversations"]) for r in out["train"]] == [
        (s["id"], s["image"], s["conversations"]) for s in source
    ]
    assert all((med / "images" / r["image"]).is_file() for r in out["train"])


def test_instruct_and_qa50_split_by_article(med, tmp_path):
    out = rows(prepare(tmp_path, med, f"data.llava_med.eval_file={QA50}", "data.split_ratios=[0.8,0.2,0]"))
    assert [len(v) for v in out.values()] == [16, 4, 4]  # 10 articles x 2 figures 8:2, 2 held-out articles x 2
    articles = [{r["meta"]["group"] for r in v} for v in out.values()]
    assert not any(a & b for a, b in itertools.combinations(articles, 2)) and [len(a) for a in articles] == [8, 2, 2]
    assert all(r["id"].split("_")[0] == r["meta"]["group"] for r in out["train"] + out["val"])
    r = out["train"][0]  # the release's `conversatons` misspelling is read; <image> stays where it was
    assert [c["from"] for c in r["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert r["conversations"][0]["value"].endswith("\n<image>")
    qa = [json.loads(line) for line in (med / QA50).read_text().splitlines()]
    assert [(t["id"], t["conversations"][0]["value"], t["meta"]["answer"], t["meta"]["type"]) for t in out["test"]] == [
        (f"qa50-{q['question_id']}", q["text"], q["gpt4_answer"], q["type"]) for q in qa
    ]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size (enough for the bomb check, which reads the header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _break(root: Path, kind: str) -> None:
    """Put one bad input of `kind` into a copy of the release."""
    instruct = json.loads((root / INSTRUCT).read_text())
    first = root / "images" / instruct[1]["image"]
    if kind == "missing_image":
        first.unlink()
    elif kind == "unreadable_image":
        first.write_bytes(b"GIF89a not really")
    elif kind == "truncated_image":
        first.write_bytes(first.read_bytes()[:300])
    elif kind == "oversized_image":
        first.write_bytes(_png_header(9000, 9000))
    elif kind == "image_outside_root":
        instruct[1]["image"] = "../../etc/passwd"
    elif kind == "duplicate_id":
        instruct[1]["id"] = instruct[0]["id"]
    elif kind == "empty_report":
        instruct[1]["conversatons"][1]["value"] = "  "
    elif kind in ("bad_record", "non_utf8"):
        lines = (root / QA50).read_bytes().splitlines(keepends=True)
        lines[1] = (
            b'{"question_id": 1, "text": "cut\n'
            if kind == "bad_record"
            else lines[1].replace(b"image", b"im\xffage", 1)
        )
        (root / QA50).write_bytes(b"".join(lines))
    if kind in ("image_outside_root", "duplicate_id", "empty_report"):
        (root / INSTRUCT).write_text(json.dumps(instruct))


# kind -> (the skip reason it is counted under, what the error says)
BAD = {
    "missing_image": ("missing_image", rf"{INSTRUCT} record 1: image .*/images/\S+\.jpg does not exist"),
    "unreadable_image": ("unreadable_image", rf"{INSTRUCT} record 1: image .*\.jpg cannot be read \(UnidentifiedImage"),
    "truncated_image": ("unreadable_image", rf"{INSTRUCT} record 1: image .*\.jpg cannot be read .*runcated"),
    "oversized_image": ("oversized_image", rf"{INSTRUCT} record 1: image .* is over the 67,108,864-pixel limit"),
    "image_outside_root": (
        "image_outside_root",
        rf"{INSTRUCT} record 1: image path '../../etc/passwd' is not a file "
        "inside the image root",
    ),
    "bad_record": ("bad_record", rf"{QA50}:2: not valid JSON \(Unterminated string"),
    "duplicate_id": ("duplicate_id", rf"{INSTRUCT} record 1: sample id '\S+' was already used at .*record 0"),
    "empty_report": ("empty_report", rf"{INSTRUCT} record 1: turn 1 \(gpt\) is empty"),
    "non_utf8": ("non_utf8", rf"{QA50}:2: line is not UTF-8 \(byte 0xff\)"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_kind_of_bad_input_is_an_error_or_a_counted_skip(med, tmp_path, kind):
    root = Path(shutil.copytree(med, tmp_path / "copy"))
    _break(root, kind)
    reason, message = BAD[kind]
    base = (f"data.llava_med.eval_file={QA50}", "data.split_ratios=[0.8,0.2,0]")
    with pytest.raises(InputError, match=message + rf".*add {reason} to data.skip"):
        prepare(tmp_path, root, *base, run_id="strict")
    assert not (tmp_path / "runs" / "tiny" / "prepare" / "strict" / "train.jsonl").exists()
    run = prepare(tmp_path, root, *base, f"data.skip=[{reason}]", run_id="skip")
    report = json.loads((run / "prepare_report.json").read_text())
    assert {k: v for k, v in report["skipped"].items() if v} == {reason: 1} and report["ok"]
    assert sum(report["splits"].values()) == 24 - 1
    assert json.loads((run / "dataset.json").read_text())["skipped"] == report["skipped"]
