"""A chain of stages through `launch/submit.py --executor local`, as a person at a terminal runs it: prepare, then
sft (with validation) and infer (a job array) under a pseudo-terminal. Progress reaches the terminal while the
stage runs; `status` and `logs` follow the chain by its one run id; the validation curve is read back with
TensorBoard's reader and equals what infer scores with the final checkpoint; a resumed run continues it."""

import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, TINY
from medlava.cluster.local import ArrayView
from medlava.cluster.monitor import status_lines
from medlava.data.samples import load_prepared
from medlava.train.validation import closed_questions
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SUBMIT = ROOT / "launch" / "submit.py"
PY = sys.executable
SFT = (
    "sft.init_from=none",
    "sft.max_steps=4",
    "sft.batch_size=8",
    "sft.eval_every=2",
    "sft.save_every=2",
    "sft.eval_closed_samples=8",
)


def under_pty(cmd: list[str], env: dict, cwd: Path) -> tuple[int, list[tuple[float, str]]]:
    """Run `cmd` with a pseudo-terminal as its stdout and stderr; what it wrote, read by read, with the time."""
    import pty

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    reads = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process and its children have closed the terminal
            break
        if not data:
            break
        reads.append((time.monotonic() - start, data.decode(errors="replace")))
    os.close(master)
    return proc.wait(timeout=60), reads


def first(reads: list[tuple[float, str]], pattern: str) -> float:
    return next(t for t, text in reads if re.search(pattern, text))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    env = {**os.environ, "MEDLAVA_CACHE": str(tmp / "cache")}
    base = [
        "--config",
        str(TINY),
        "--executor",
        "local",
        "--output-root",
        str(tmp / "runs"),
        f"data.root={tmp / 'ham'}",
        "data.synthetic.n_lesions=40",
        "run_id=c",
    ]
    prepared = subprocess.run([PY, str(SUBMIT), "prepare", *base], capture_output=True, text=True, env=env, cwd=tmp)
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    sft_rc, sft = under_pty([PY, str(SUBMIT), "sft", *base, *SFT], env, tmp)
    assert sft_rc == 0, "".join(text for _, text in sft)[-3000:]
    infer_rc, infer = under_pty(
        [PY, str(SUBMIT), "infer", *base, "infer.split=val", "infer.chunks=2", "infer.num_workers=0"], env, tmp
    )
    assert infer_rc == 0, "".join(text for _, text in infer)[-3000:]
    return {
        "tmp": tmp,
        "env": env,
        "runs": tmp / "runs" / "tiny",
        "prepare": prepared.stdout,
        "sft": sft,
        "infer": infer,
    }


def monitor(chain, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, str(SUBMIT), *args, "--output-root", str(chain["tmp"] / "runs")],
        capture_output=True,
        text=True,
        env=chain["env"],
        cwd=chain["tmp"],
    )


def test_training_progress_reaches_the_terminal_while_it_runs(chain):
    reads = chain["sft"]
    text = "".join(t for _, t in reads)
    # tqdm saw a terminal: the bar is redrawn in place (\r), with its rate, loss and throughput
    assert re.search(r"\rsft:  25%\|[^\r]*\| 1/4 \[[^\r]*(?:it/s|s/it), loss=[\d.]+, tok_s=\d+\]", text), text[-2000:]
    # Each step's redraw arrives on its own, as it is drawn: a line-by-line relay would hand over the whole bar
    # line (0/4 ... 4/4) in one piece when a newline finally ends it.
    bars = [(t, set(re.findall(r"\| ([0-4])/4 ", x))) for t, x in reads if re.search(r"\| [0-4]/4 ", x)]
    assert len(bars) >= 3 and not any({"1", "4"} <= steps for _, steps in bars), bars
    assert first(reads, r"\| 1/4 ") < first(reads, r"\| 4/4 ") < reads[-1][0]
    assert re.search(r"step 2: validation loss [\d.]+, closed-question accuracy [\d.]+ on 8", text)


def test_array_tasks_show_answers_per_second_on_the_terminal(chain):
    reads = chain["infer"]
    text = "".join(t for _, t in reads)
    for i in (0, 1):  # the task's last line: its bar, or the answering's closing line after it
        assert re.search(
            rf"task {i} done: chunk {i}/2: (100% \d+/\d+ \[.*answer/s\]|\d+ answers in .*answers/s\))", text
        ), text[-3000:]
    assert first(reads, r"\r\[[01]\] ") < first(reads, r"task [01] done"), "no live line before a task ended"


def test_array_view_keeps_each_tasks_latest_progress_without_the_bar():
    view = ArrayView.__new__(ArrayView)  # the line alone, without drawing
    view.latest, view.running = {}, {0, 1}
    view.latest[0] = ArrayView.compact("chunk 0/2:  40%|████      | 4/10 [00:02<00:03,  2.00answer/s]")
    assert view.line() == "[0] chunk 0/2: 40% 4/10 [00:02<00:03, 2.00answer/s] | [1] starting"
    logged = "16:16:45 [rank 0] medlava.infer.answer: chunk 1/2: 8 answers in 0.7 s (12.09 answers/s)"
    assert ArrayView.compact(logged) == "chunk 1/2: 8 answers in 0.7 s (12.09 answers/s)"  # the message alone


def test_status_and_logs_follow_the_chain_by_its_run_id(chain):
    runs = chain["runs"]
    status = monitor(chain, "status", "c")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"run c  ({runs})" and status.stdout.count("run c ") == 1  # the id once, the stages below
    for stage in ("prepare", "sft", "infer"):
        assert f"  {stage:<10} complete      {runs / stage / 'c'}" in lines
    assert re.search(r"^    infer-chunks +local +COMPLETED x2 \(array of 2\)$", status.stdout, re.M)
    for job in ("prepare", "sft", "infer-merge"):
        assert re.search(rf"^    {job} +local +COMPLETED$", status.stdout, re.M), status.stdout
    with_events = [stage for stage in ("prepare", "sft", "infer") if list((runs / stage / "c").glob("tensorboard/*"))]
    assert "sft" in with_events and "prepare" not in with_events
    expected = runs / with_events[0] / "c" if len(with_events) == 1 else runs  # the run, or the folder above them
    assert lines[-1] == f"TensorBoard: tensorboard --logdir {expected}"
    assert "run id c (python launch/submit.py status c" in chain["prepare"]
    assert (
        "TensorBoard" not in chain["prepare"]
        and "TensorBoard" not in monitor(chain, "status", str(runs / "prepare" / "c")).stdout
    )  # prepare writes no events: no hint
    logs = monitor(chain, "logs", "c", "--job", "infer-chunks", "--task", "1")
    assert logs.returncode == 0 and f"==> {runs / 'infer' / 'c' / 'logs' / 'infer-chunks_1.log'} <==" in logs.stdout
    assert "chunk 1/2: 100%" in logs.stdout and "chunk 0/2" not in logs.stdout
    assert "validation loss" in monitor(chain, "logs", "c", "--job", "sft").stdout
    assert monitor(chain, "status").stdout == status.stdout  # no run named: the newest, here this one


def scalars(run: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_validation_curve_equals_what_infer_scores_with_the_final_checkpoint(chain):
    runs = chain["runs"]
    loss, accuracy = scalars(runs / "sft" / "c", "val/loss"), scalars(runs / "sft" / "c", "val/closed_accuracy")
    assert sorted(loss) == sorted(accuracy) == [2, 4] and loss[4] < loss[2]
    subset = {str(s["id"]) for s in closed_questions(load_prepared(runs / "prepare" / "c", "val")[0])[:8]}
    predictions = pd.read_csv(runs / "infer" / "c" / "predictions.csv", dtype=str, keep_default_na=False)
    scored = predictions[predictions["id"].isin(subset)]
    assert len(scored) == 8
    assert accuracy[4] == pytest.approx((scored["prediction"] == scored["reference"]).mean(), abs=1e-7)


def test_a_resumed_run_continues_the_validation_curve(chain):
    """Cut the run back to its step-2 checkpoint (as a kill after it would): the re-run validates step 4 again,
    once, with the value the uninterrupted run logged."""
    out = chain["tmp"] / "resumed"
    for stage in ("prepare", "sft"):
        shutil.copytree(chain["runs"] / stage / "c", out / "tiny" / stage / "c")
    run = out / "tiny" / "sft" / "c"
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "COMPLETE.json").unlink()
    again = subprocess.run(
        [
            PY,
            "-m",
            "medlava",
            "sft",
            "--config",
            str(TINY),
            f"output_root={out}",
            "run_id=c",
            f"data.root={chain['tmp'] / 'ham'}",
            "data.synthetic.n_lesions=40",
            *SFT,
        ],
        capture_output=True,
        text=True,
        env=chain["env"],
        cwd=chain["tmp"],
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2 of 4" in again.stderr
    whole, resumed = scalars(chain["runs"] / "sft" / "c", "val/loss"), scalars(run, "val/loss")
    assert sorted(resumed) == [2, 4] and resumed == pytest.approx(whole, rel=1e-4)
    assert sorted(scalars(run, "train/loss")) == [1, 2, 3, 4]


def test_status_reconciles_jobs_their_scheduler_forgot_with_complete_json(tmp_path):
    def run_dir(name: str, complete: bool, executor: str) -> Path:
        d = tmp_path / "tiny" / "sft" / name
        if executor == "slurm":
            (d / "slurm").mkdir(parents=True)
            (d / "slurm" / "submissions.json").write_text(
                json.dumps(
                    [{"name": "sft", "job_id": "999999991", "array": None, "submitted": "2025-01-01T00:00:00+0000"}]
                )
            )
        else:
            (d / "logs").mkdir(parents=True)
            (d / "logs" / "local.json").write_text(
                json.dumps(
                    [
                        {
                            "name": "sft",
                            "array": None,
                            "host": os.uname().nodename,
                            "started": "2025-01-01T00:00:00+0000",
                            "ended": None,
                            "tasks": [
                                {"idx": None, "command": "x", "log": "sft.log", "pid": 2**22 + 7, "exit_code": None}
                            ],
                        }
                    ]
                )
            )
        if complete:
            (d / "COMPLETE.json").write_text("{}")
        return d

    lines = status_lines(
        [run_dir("done", True, "slurm"), run_dir("lost", False, "slurm"), run_dir("killed", True, "local")]
    )
    text = "\n".join(lines)
    assert re.search(r"    sft +job 999999991 +COMPLETED per COMPLETE.json \(SLURM no longer knows the job\)", text)
    assert "ended, outcome unknown (SLURM no longer knows the job); the run is not complete: see `logs`" in text
    assert re.search(r"    sft +local +COMPLETED per COMPLETE.json \(its launcher stopped before the exit\)", text)
    assert "unknown to SLURM" not in text and text.count("[complete]") == 0
