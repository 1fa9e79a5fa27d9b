"""infer on a LLaVA-Med question file: killed mid-chunk by SIGKILL and re-run (every id once, nothing
answered twice or lost), free text mapped to choices by the normaliser, meta carried to predictions.csv,
and the result scored by `medlava eval`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from medlava.config import load_config
from medlava.distributed import Dist
from medlava.eval.normalize import map_answer
from medlava.infer.chunks import chunk_of, chunk_path, partial_path, settings_path
from medlava.infer.questions import question_sample
from medlava.io import InputError
from medlava.stages.infer import run as run_infer
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """30 questions: HAM10000 closed with choices, SLAKE-like closed yes/no and open, one without an image."""
    root = tmp_path_factory.mktemp("q")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        name = f"img/{i:03d}.png"
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name)
        if i % 3 == 0:
            rows.append(
                {
                    "question_id": f"h{i}",
                    "image": name,
                    "text": "What is the lesion type?",
                    "choices": HAM,
                    "answer": HAM[i % 7],
                    "answer_type": "CLOSED",
                    "modality": "dermoscopy",
                }
            )
        elif i % 3 == 1:
            rows.append(
                {
                    "question_id": f"y{i}",
                    "image": name,
                    "text": "Is there a pleural effusion?",
                    "answer": "Yes" if i % 2 else "No",
                    "answer_type": "CLOSED",
                    "modality": "X-Ray",
                    "content_type": "Abnormality",
                }
            )
        else:
            rows.append(
                {
                    "question_id": i,
                    "image": name if i != 29 else "",
                    "text": "Which organ is shown?",
                    "answer": "left lung",
                    "answer_type": "OPEN",
                    "modality": "CT",
                    "content_type": "Organ",
                    "triple": ["vhead", "_", "_"],
                }
            )
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tiny checkpoint for the module (MEDLAVA_CACHE), built by whichever test runs first."""
    return tmp_path_factory.mktemp("cache")


def _overrides(out: Path, questions: Path, run_id: str, **extra) -> list[str]:
    items = {
        "output_root": out,
        "run_id": run_id,
        "infer.questions": questions,
        "infer.checkpoint": "base",
        "infer.chunks": 2,
        "infer.batch_size": 2,
        "infer.max_new_tokens": 4,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def test_killed_mid_chunk_resumes_and_merges_every_id_once(tmp_path, questions, cache):
    env = {**os.environ, "MEDLAVA_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    # The child writes two batches, then half of the next row, and is SIGKILLed there: the state a kill
    # during a write leaves (complete rows fsynced, a torn last line, no finished chunk file).
    hook = tmp_path / "killable.py"
    hook.write_text(
        textwrap.dedent("""
        import sys, time
        from medlava.infer import chunks
        original, calls = chunks.ChunkWriter.write, []
        def write(self, rows):
            original(self, rows)
            calls.append(len(rows))
            if len(calls) == 2:
                self._f.write('{"question_id": "torn-'); self._f.flush()
                print("WRITING", flush=True)
                time.sleep(600)
        chunks.ChunkWriter.write = write
        from medlava.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    )
    args = ["infer", "--config", str(TINY), *_overrides(tmp_path / "runs", questions, "k1")]
    child = subprocess.Popen(
        [sys.executable, str(hook), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    lines = []
    for line in child.stdout:  # blocks until the child prints; the deadline guards a hung child
        lines.append(line)
        if line.rstrip().endswith("WRITING") or time.monotonic() > deadline:  # after tqdm's \r output
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "".join(lines)[-3000:]

    run = tmp_path / "runs" / "tiny" / "infer" / "k1"
    first = chunk_path(run / "chunks", 0, 2)
    torn = partial_path(first).read_text()
    assert not first.exists() and torn.endswith('"torn-') and not (run / "predictions.csv").exists()
    before = [json.loads(line) for line in torn.splitlines()[:-1]]
    assert len(before) == 4  # two batches of two

    out = subprocess.run(
        [sys.executable, "-m", "medlava", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = [str(json.loads(line)["question_id"]) for line in questions.read_text().splitlines()]
    pred = pd.read_csv(run / "predictions.csv", dtype={"id": str}, keep_default_na=False)
    assert sorted(pred["id"]) == sorted(ids) and pred["id"].is_unique
    answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert [str(a["question_id"]) for a in answers] == ids  # the question file's order
    # LLaVA-Med's run_eval.py asserts gt_ids == pred_ids: the ids come back as the question file has them.
    question_ids = [json.loads(line)["question_id"] for line in questions.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == question_ids and 2 in question_ids and "h0" in question_ids
    assert all(isinstance(a["text"], str) for a in answers)
    chunk0 = [json.loads(line) for line in first.read_text().splitlines()]
    assert chunk0[:4] == before  # the rows written before the kill were kept, not recomputed
    assert {str(r["question_id"]) for r in chunk0} == {i for i in ids if chunk_of(i, 2) == 0}
    assert not partial_path(first).exists()
    # Closed questions with choices were scored (probabilities over the 7 classes), the rest generated.
    scored = pred[pred["id"].str.startswith("h")]
    cols = [f"score_{c}" for c in HAM]
    assert np.allclose(scored[cols].astype(float).sum(axis=1), 1, atol=1e-5)
    assert (scored["prediction"] == scored[cols].astype(float).idxmax(axis=1).str[6:]).all()
    assert {a["metadata"]["mode"] for a in answers if not str(a["question_id"]).startswith("h")} == {"generate"}
    assert json.loads((run / "COMPLETE.json").read_text())["questions"] == str(questions)


def test_generate_mode_normalises_choices_and_carries_meta(tmp_path, questions, cache, monkeypatch):
    monkeypatch.setenv("MEDLAVA_CACHE", str(cache))
    cfg = load_config(
        TINY,
        _overrides(
            tmp_path / "runs", questions, "g1", **{"infer.mode": "generate", "infer.chunks": 1, "infer.batch_size": 8}
        ),
    )
    run = run_infer(cfg, Dist(0, 1, 0, torch.device("cpu")))
    answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    pred = pd.read_csv(run / "predictions.csv", dtype=str, keep_default_na=False).set_index("id")
    statuses = {}
    for a in answers:
        md, qid = a["metadata"], str(a["question_id"])
        if md["choices"]:
            mapped = map_answer(a["text"], md["choices"])
            assert md["prediction"] == (mapped.choice or "") and md["normalized"] == mapped.status
            statuses[mapped.status] = statuses.get(mapped.status, 0) + 1
        else:
            assert md["prediction"] == a["text"] and "normalized" not in md
        assert pred.loc[qid, "prediction"] == md["prediction"] and pred.loc[qid, "text"] == a["text"]
    done = json.loads((run / "COMPLETE.json").read_text())
    assert done["normalized"] == statuses
    # TensorBoard: answers/s of the chunk, and how the answers were read (at the checkpoint's step; base: 0)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("infer/answers_per_s")[0].value > 0
    unmapped = statuses.get("unmapped", 0) + statuses.get("negated", 0)  # no choice named: scored wrong
    assert acc.Scalars("infer/n_unmapped")[0].value == done["answers_read"]["n_unmapped"] == unmapped
    assert done["answers_read"]["n_mapped"] == sum(statuses.values()) - unmapped
    free = sum(not a["metadata"]["choices"] for a in answers)  # open, and closed without evident choices
    assert acc.Scalars("infer/share_free_text")[0].value == pytest.approx(free / len(answers)) and done["step"] == 0
    assert not [c for c in pred.columns if c.startswith("score_")]
    assert pred.loc["y1", "meta_answer_type"] == "CLOSED" and pred.loc["y1", "meta_modality"] == "X-Ray"
    assert pred.loc["2", "meta_content_type"] == "Organ" and "meta_triple" not in pred.columns  # lists left out
    assert pred.loc["y1", "prompt"] == "Is there a pleural effusion?" and pred.loc["y1", "task"] == "closed"

    # The same predictions through the scoring command: open rows make it the VQA family.
    from medlava.cli import main

    assert main(["eval", "--predictions", str(run), "--out", str(tmp_path / "ev"), "--n-bootstrap", "20"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["family"] == "vqa" and m["n_closed"] == 20 and m["n_open"] == 10
    assert set(m["by_group"]["modality"]) == {"CT", "X-Ray", "dermoscopy"}
    per = pd.read_csv(tmp_path / "ev" / "per_sample.csv", dtype={"id": str}, keep_default_na=False)
    assert sorted(per["id"]) == sorted(pred.index)


def test_a_bad_image_stops_infer_with_the_message_not_a_traceback(tmp_path, questions, cache):
    rows = [json.loads(line) for line in questions.read_text().splitlines()][:6]
    for r in rows:
        shutil.copy(questions.parent / r["image"], tmp_path / Path(r["image"]).name)
        r["image"] = Path(r["image"]).name
    (tmp_path / rows[4]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = tmp_path / "questions.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "MEDLAVA_CACHE": str(cache)}
    args = _overrides(tmp_path / "runs", bad, "b1", **{"infer.chunks": 1, "infer.num_workers": 2})
    out = subprocess.run(
        [sys.executable, "-m", "medlava", "infer", "--config", str(TINY), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        f"medlava infer: image {tmp_path / rows[4]['image']} (sample {rows[4]['question_id']}) cannot be read"
        in out.stderr
        and "Traceback" not in out.stderr
    )


def test_question_keeps_its_id_type_and_gets_the_image_first():
    """As LLaVA-Med's model_vqa.py: `<image>` out of the text and first (its qa50 questions end with it)."""
    s = question_sample({"question_id": 3, "image": "a.png", "text": "What is shown?\n<image>"}, "q.jsonl row 1")
    assert s["question_id"] == 3 and s["id"] == "3"
    assert s["conversations"][0]["value"] == "<image>\nWhat is shown?"
    with pytest.raises(InputError, match="row 1: `question_id` must be a string or an integer"):
        question_sample({"question_id": 1.5, "text": "q"}, "q.jsonl row 1")


def _infer(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDLAVA_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "medlava", "infer", "--config", str(TINY), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_image_too_large_once_padded_is_refused(tmp_path, cache):
    """9000x1 is within the pixel count; padded to a square (model.image_aspect=pad) it is 9000^2 pixels."""
    Image.new("RGB", (9000, 1)).save(tmp_path / "wide.png")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": "w1", "image": "wide.png", "text": "What is shown?"}) + "\n")
    out = _infer(tmp_path, cache, *_overrides(tmp_path / "runs", q, "w", **{"infer.chunks": 1}))
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        f"medlava infer: image {tmp_path / 'wide.png'} (sample w1) is 9000x1: padded to a square it would be "
        "9000x9000 = 81,000,000 pixels, over the 67,108,864-pixel limit"
    ) in out.stderr, out.stderr[-3000:]


@pytest.fixture(scope="module")
def answered(tmp_path_factory, questions, cache) -> tuple[Path, list[str]]:
    """A finished infer run of the question file (2 chunks, base model, option scoring); (run, its overrides)."""
    tmp = tmp_path_factory.mktemp("answered")
    args = _overrides(tmp / "runs", questions, "a")
    out = _infer(tmp, cache, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "runs" / "tiny" / "infer" / "a", args


def test_a_rerun_with_other_settings_is_refused_not_mixed_with_the_old_chunks(tmp_path, answered, cache):
    run, args = answered
    unfinished = tmp_path / "runs" / "tiny" / "infer" / "u"  # its merge not done yet: chunk tasks may continue it
    shutil.copytree(run, unfinished)
    for name in ("COMPLETE.json", "answers.jsonl", "predictions.csv"):
        (unfinished / name).unlink()
    args = [a for a in args if not a.startswith(("run_id=", "output_root="))] + [
        f"output_root={tmp_path / 'runs'}",
        "run_id=u",
    ]
    files = {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file() and p.parent.name != "logs"}
    out = _infer(tmp_path, cache, *args, "infer.mode=generate", "infer.max_new_tokens=8")
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        f"medlava infer: the answers in {unfinished / 'chunks'} were made with other settings "
        "(infer.max_new_tokens: 4 then, 8 now; infer.mode: 'score' then, 'generate' now); one answer file must "
        "come from one model and one setting: use a new run_id"
    ) in out.stderr, out.stderr[-3000:]
    assert {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file() and p.parent.name != "logs"} == files
    source = json.loads((unfinished / "chunks" / "source.json").read_text())
    assert source["infer.checkpoint"] == "base" and source["infer.mode"] == "score"


def test_a_damaged_chunk_file_is_named_not_a_traceback(tmp_path, answered, cache):
    run, args = answered
    copy = tmp_path / "runs" / "tiny" / "infer" / "d"
    shutil.copytree(run, copy)
    (copy / "COMPLETE.json").unlink()  # merged again below
    last = chunk_path(copy / "chunks", 1, 2)
    lines = last.read_text().splitlines(keepends=True)
    last.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2] + "\n")  # a torn, newline-ended row
    args = [a for a in args if not a.startswith(("run_id=", "output_root="))]
    out = _infer(tmp_path, cache, *args, f"output_root={tmp_path / 'runs'}", "run_id=d", "--merge-only")
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        f"medlava infer: {last}:{len(lines)}: not a JSON answer row (" in out.stderr
        and "the chunk file is damaged; delete it and run chunk 1 again (--chunk-idx 1), then merge" in out.stderr
        and "Traceback" not in out.stderr
    ), out.stderr[-3000:]


def test_a_question_longer_than_the_model_s_context_is_refused(tmp_path, cache):
    q = tmp_path / "q.jsonl"
    Image.new("RGB", (40, 48)).save(tmp_path / "a.png")
    long = "Describe every finding in this image, in order, " * 40
    q.write_text(json.dumps({"question_id": "long1", "image": "a.png", "text": long}) + "\n")
    out = _infer(
        tmp_path, cache, *_overrides(tmp_path / "runs", q, "l", **{"infer.chunks": 1, "infer.mode": "generate"})
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.search(
        r"medlava infer: sample long1: the prompt is \d+ tokens \(image tokens included\), over "
        r"model.model_max_length=256; .* Shorten the question or raise model.model_max_length",
        out.stderr,
    ), out.stderr[-3000:]


def _sft_run(runs: Path, run_id: str, seed: int) -> Path:
    """A complete sft run whose checkpoint is the tiny base model with a projector drawn from `seed`."""
    from medlava.artifacts import MANIFEST
    from medlava.models.llava import (
        PROJECTOR_FILE,
        base_model_path,
        load_model,
        load_processor,
        save_projector,
    )

    m = load_config(TINY).model
    base = base_model_path(m)
    model = load_model(base, m, torch.float32)
    torch.manual_seed(seed)
    for p in model.model.multi_modal_projector.parameters():
        torch.nn.init.normal_(p, std=0.5)
    run = runs / "tiny" / "sft" / run_id
    ckpt = run / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    save_projector(model, ckpt / PROJECTOR_FILE)
    load_processor(base, m).save_pretrained(ckpt)
    (ckpt / MANIFEST).write_text(
        json.dumps({"kind": "projector", "step": 1, "base_model": base, "stage": "sft", "template": m.template})
    )
    (run / "COMPLETE.json").write_text(json.dumps({"checkpoint": "checkpoints/step-000001"}))
    return run


def test_one_run_s_chunks_come_from_one_checkpoint(tmp_path, questions, cache, monkeypatch):
    """A newer sft run completing while the chunks are answered (each resolving `latest` itself, as the plain
    sbatch scripts do) is refused for the rest; a chunk file from another model copied in is refused by the merge."""
    monkeypatch.setenv("MEDLAVA_CACHE", str(cache))
    runs = tmp_path / "runs"
    older = _sft_run(runs, "older", seed=1)
    common = [*_overrides(runs, questions, "x"), "infer.checkpoint=latest"]
    first = _infer(tmp_path, cache, *common, "--chunk-idx", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    time.sleep(0.05)
    newer = _sft_run(runs, "newer", seed=2)
    late = _infer(tmp_path, cache, *common, "--chunk-idx", "1")
    assert late.returncode == 2, late.stderr[-3000:]
    a, b = (str((r / "checkpoints" / "step-000001").absolute()) for r in (older, newer))
    assert f"infer.checkpoint: '{a}' then, '{b}' now" in late.stderr, late.stderr[-3000:]

    other = _infer(tmp_path, cache, *_overrides(runs, questions, "y"), f"infer.checkpoint={newer}", "--chunk-idx", "1")
    assert other.returncode == 0, other.stderr[-3000:]
    chunks = runs / "tiny" / "infer" / "x" / "chunks"
    theirs = chunk_path(runs / "tiny" / "infer" / "y" / "chunks", 1, 2)
    shutil.copy(theirs, chunks)  # without the record of its settings
    merged = _infer(tmp_path, cache, *common, f"infer.checkpoint={older}", "--merge-only")
    assert merged.returncode == 2, merged.stderr[-3000:]
    mine = chunk_path(chunks, 1, 2)
    assert (
        f"medlava infer: {mine} has no record of the settings it was made with (answers-0001-of-0002.settings"
        ".json): it was not made by this run"
    ) in merged.stderr, merged.stderr[-3000:]
    shutil.copy(settings_path(theirs), chunks)  # with it
    merged = _infer(tmp_path, cache, *common, f"infer.checkpoint={older}", "--merge-only")
    assert merged.returncode == 2, merged.stderr[-3000:]
    assert (
        f"medlava infer: {mine} was made with other settings (infer.checkpoint: '{b}' then, '{a}' now); "
        "one answer file must come from one model and one setting"
    ) in merged.stderr, merged.stderr[-3000:]
    assert not (runs / "tiny" / "infer" / "x" / "answers.jsonl").exists()


def test_the_merge_compares_each_chunk_s_settings(tmp_path, answered, cache):
    """Chunk 1 answered again with infer.mode=generate beside chunk 0's option scores (source.json removed in
    between, as in a hand-cleaned folder): the merge refuses, naming the chunk and the keys."""
    run, args = answered
    args = [a for a in args if not a.startswith(("run_id=", "output_root="))] + [
        f"output_root={tmp_path / 'runs'}",
        "run_id=m",
    ]
    copy = tmp_path / "runs" / "tiny" / "infer" / "m"
    shutil.copytree(run, copy)
    for name in ("COMPLETE.json", "answers.jsonl", "predictions.csv", "chunks/source.json"):
        (copy / name).unlink()
    first, second = chunk_path(copy / "chunks", 0, 2), chunk_path(copy / "chunks", 1, 2)
    second.unlink()
    settings_path(second).unlink()
    out = _infer(tmp_path, cache, *args, "infer.mode=generate", "--chunk-idx", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert {json.loads(line)["metadata"]["mode"] for line in second.read_text().splitlines()} == {"generate"}
    merged = _infer(tmp_path, cache, *args, "infer.mode=generate", "--merge-only")
    assert merged.returncode == 2, merged.stderr[-3000:]
    assert (
        f"medlava infer: {first} was made with other settings (infer.mode: 'score' then, 'generate' now); "
        "one answer file must come from one model and one setting: delete that chunk and make it again, or use "
        "a new run_id"
    ) in merged.stderr, merged.stderr[-3000:]
    assert not (copy / "answers.jsonl").exists() and not (copy / "COMPLETE.json").exists()
