"""Training: 2-process DDP (gloo) under torchrun, exact resume after a kill, checkpoint reload."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, torchrun
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _losses(run: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    env = {**os.environ, "MEDLAVA_CACHE": str(tmp / "cache")}
    base = [
        "--config",
        str(TINY),
        f"output_root={tmp / 'runs'}",
        f"data.root={tmp / 'ham'}",
        "data.synthetic.n_lesions=60",
    ]
    subprocess.run(
        [sys.executable, "-m", "medlava", "prepare", *base, "run_id=p"], env=env, check=True, capture_output=True
    )
    return tmp, env, base


def _sft_cmd(prepared, run_id, *extra) -> list[str]:
    _, _, base = prepared
    return [sys.executable, "-m", "medlava", "sft", *base, f"run_id={run_id}", "sft.init_from=none", "sft.batch_size=4",
            *extra]  # fmt: skip


def _launch(prepared, run_id, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(_sft_cmd(prepared, run_id, *extra), env=prepared[1], capture_output=True, text=True)


def _sft(prepared, run_id, *extra, popen=False):
    cmd = _sft_cmd(prepared, run_id, *extra)
    if popen:
        return subprocess.Popen(cmd, env=prepared[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = _launch(prepared, run_id, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    return prepared[0] / "runs" / "tiny" / "sft" / run_id


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / json.loads((run / "COMPLETE.json").read_text())["checkpoint"]
    return load_file(str(ckpt / "trainable.safetensors"))


ARGS = ("sft.max_steps=24", "sft.save_every=4", "sft.grad_accum=2")


@pytest.fixture(scope="module")
def whole(prepared):
    return _sft(prepared, "whole", *ARGS)


@pytest.mark.parametrize(
    "sig, code, strategy",
    [(signal.SIGKILL, -signal.SIGKILL, "none"), (signal.SIGUSR2, 75, "none"), (signal.SIGUSR2, 75, "zero3")],
)
def test_interrupted_run_resumes_to_the_same_weights_and_loss_curve(prepared, whole, sig, code, strategy):
    """SIGKILL: resume from the last periodic checkpoint. SIGUSR2 (SLURM's pre-timeout signal): the loop
    saves a checkpoint at the step it stopped and exits with EXIT_REQUEUE (75). Under DeepSpeed the
    optimizer state comes back from its own sharded checkpoint; the result equals the plain run."""
    if strategy != "none":
        pytest.importorskip("deepspeed")
    run_id = f"interrupted-{sig.name}-{strategy}"
    args = (*ARGS, f"sft.deepspeed={strategy}")
    proc = _sft(prepared, run_id, *args, popen=True)
    ckpts = prepared[0] / "runs" / "tiny" / "sft" / run_id / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-000008").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    assert proc.wait() == code
    run = ckpts.parent
    assert not (run / "COMPLETE.json").exists(), "the run finished before it could be interrupted"
    steps_done = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 8 <= steps_done < 24
    if sig == signal.SIGUSR2:  # the step it stopped at was saved, not only the last periodic one
        assert max(_losses(run)) == steps_done

    resumed = _sft(prepared, run_id, *args)
    a, b = _final_weights(whole), _final_weights(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = _losses(whole), _losses(resumed)
    assert sorted(la) == sorted(lb) == list(range(1, 25))
    assert [lb[s] for s in sorted(lb)] == pytest.approx([la[s] for s in sorted(la)], rel=1e-4)


def test_a_stray_copy_in_checkpoints_does_not_stop_a_resume(prepared):
    run = _sft(prepared, "bak", "sft.max_steps=4", "sft.save_every=2")
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if killed after step 2's checkpoint
    (run / "COMPLETE.json").unlink()
    shutil.copytree(run / "checkpoints" / "step-000002", run / "checkpoints" / "step-100.bak")  # a user's backup
    tmp, env, base = prepared
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlava",
            "sft",
            *base,
            "run_id=bak",
            "sft.init_from=none",
            "sft.batch_size=4",
            "sft.max_steps=4",
            "sft.save_every=2",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2 of 4" in out.stderr, out.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-100.bak"]


SLOW_RANK = """
import sys, time
from medlava.train import checkpoint
rng_state = checkpoint._rng_state
def slow_rng_state():  # rank 1 writes its RNG file 3 s after the others (a slow shared file system)
    time.sleep(3)
    return rng_state()
if __import__("os").environ["RANK"] == "1":
    checkpoint._rng_state = slow_rng_state
from medlava.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_becomes_step_n_only_after_every_rank_wrote_its_part(prepared, tmp_path):
    tmp, env, base = prepared
    driver = tmp_path / "slow_rank.py"
    driver.write_text(SLOW_RANK)
    out = subprocess.run(
        [
            *torchrun(2),
            str(driver),
            "sft",
            *base,
            "run_id=slow-rank",
            "sft.init_from=none",
            "sft.batch_size=4",
            "sft.max_steps=2",
            "sft.save_every=1",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ckpts = tmp / "runs" / "tiny" / "sft" / "slow-rank" / "checkpoints"
    for step in ("step-000001", "step-000002"):
        assert {"rng-0.pt", "rng-1.pt"} <= {p.name for p in (ckpts / step).iterdir()}
    assert not list(ckpts.glob(".*.tmp"))


def _files(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_a_finished_run_is_never_rewritten(prepared, whole):
    """Relaunched, with its own settings or others: refused, and nothing in it changes (its config.yaml, its
    COMPLETE.json, whose time `latest` goes by)."""
    before = _files(whole)
    for extra in ((), ("sft.lr=0.05",), ("sft.resume=never",)):
        out = _launch(prepared, "whole", *ARGS, *extra)
        assert out.returncode == 2, out.stderr[-3000:]
        assert (
            f"medlava sft: {whole} already holds a complete sft run (started " in out.stderr
            and "and a finished run is never rewritten: choose another run_id, or leave it unset for a new one"
            in out.stderr
        ), out.stderr[-3000:]
    assert _files(whole) == before


@pytest.fixture
def stopped(prepared, whole, tmp_path):
    """`whole` as a job killed after its last checkpoint but before COMPLETE.json: a run a relaunch continues."""
    run = whole.parent / f"stopped-{tmp_path.name}"
    shutil.copytree(whole, run)
    (run / "COMPLETE.json").unlink()
    return run


def test_a_started_run_is_not_continued_with_resume_never(prepared, stopped):
    out = _launch(prepared, stopped.name, *ARGS, "sft.resume=never")
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        f"medlava sft: {stopped} already holds a started sft run (started " in out.stderr
        and "choose another run_id, or leave it unset for a new one (or sft.resume=auto to continue it)" in out.stderr
    ), out.stderr[-3000:]


def test_a_resume_with_other_settings_or_data_is_refused_naming_them(prepared, stopped, tmp_path):
    """Each checkpoint records what decides the weights (the sft section, the model, the training split's
    digest); a resume with others would continue the old optimizer while config.yaml says otherwise."""
    tmp = prepared[0]
    ckpt = stopped / "checkpoints" / "step-000024"
    manifest = json.loads((ckpt / "medlava.json").read_text())
    assert manifest["settings"]["sft.lr"] == 2e-3 and len(manifest["settings_hash"]) == 16
    other = tmp_path / "fewer"  # the same data, one sample less (outside runs/: `latest` stays what it was)
    shutil.copytree(tmp / "runs" / "tiny" / "prepare" / "p", other)
    lines = (other / "train.jsonl").read_text().splitlines(keepends=True)
    (other / "train.jsonl").write_text("".join(lines[1:]))
    before = _files(stopped)
    out = _launch(prepared, stopped.name, *ARGS, "sft.lr=0.05", "sft.lora.r=8", f"data.samples={other}",
                  "model.model_max_length=300")  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    old, new = manifest["settings"]["data.train"], hashlib.sha256((other / "train.jsonl").read_bytes()).hexdigest()
    for changed in (
        f"medlava sft: {ckpt} was trained with other settings (data.train: '{old}' then, '{new}' now",
        "; model.model_max_length: 256 then, 300 now; sft.lora.r: 16 then, 8 now; ",
        "; sft.lr: 0.002 then, 0.05 now)",
        "; resuming it with these would mix two trainings in one set of weights: relaunch with its "
        f"settings ({stopped / 'config.yaml'}), or leave run_id unset to train a new run",
    ):
        assert changed in out.stderr, out.stderr[-3000:]
    assert _files(stopped) == before  # config.yaml still says what the checkpoints were trained with
    out = _launch(prepared, stopped.name, *ARGS)  # its own settings: it continues
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {ckpt} at step 24 of 24" in out.stderr and (stopped / "COMPLETE.json").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_loss(prepared):
    """sft.lr=1e30 (finite, so the config takes it): the loss is NaN by the third step. Training stops there,
    naming the step, the last finite loss and the key; no checkpoint of that step, no COMPLETE.json."""
    out = _launch(prepared, "nan", "sft.max_steps=6", "sft.save_every=1", "sft.lr=1e30")
    assert out.returncode == 2, out.stderr[-3000:]
    m = re.search(
        r"medlava sft: training diverged: the loss is nan at step (\d+) \(the last finite loss was "
        r"[\d.]+ at step (\d+)\); no checkpoint of it is written and the run is not complete\. Lower "
        r"sft\.lr \(now 1e\+30\) and train a new run_id",
        out.stderr,
    )
    assert m and int(m[2]) == int(m[1]) - 1, out.stderr[-3000:]
    run = prepared[0] / "runs" / "tiny" / "sft" / "nan"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in range(1, int(m[1]))]
    assert not (run / "COMPLETE.json").exists()


def test_training_refuses_an_image_too_large_once_padded(tmp_path):
    """Images not checked by prepare (data.verify_images=none): the first too-wide one stops sft with its name."""
    from medlava.data.synthetic import make_synthetic_ham10000
    from PIL import Image

    root = make_synthetic_ham10000(tmp_path / "ham", n_lesions=14, max_images_per_lesion=1)
    for path in root.glob("HAM10000_images_part_*/*.jpg"):
        Image.new("RGB", (1, 9000)).save(path, "JPEG")  # padded to a square: 9000^2 pixels each
    env = {**os.environ, "MEDLAVA_CACHE": str(tmp_path / "cache")}
    base = [
        "--config",
        str(TINY),
        f"output_root={tmp_path / 'runs'}",
        f"data.root={root}",
        "data.synthetic=null",
        "data.verify_images=none",
    ]
    subprocess.run(
        [sys.executable, "-m", "medlava", "prepare", *base, "run_id=p"], env=env, check=True, capture_output=True
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlava",
            "sft",
            *base,
            "run_id=w",
            "sft.init_from=none",
            "sft.batch_size=2",
            "sft.max_steps=1",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.search(
        r"medlava sft: image \S+\.jpg \(sample \S+\) is 1x9000: padded to a square it would be "
        r"9000x9000 = 81,000,000 pixels, over the 67,108,864-pixel limit",
        out.stderr,
    ), out.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["none", "zero2", "zero3"])
def test_two_process_training_loss_falls_and_checkpoint_reloads(prepared, strategy):
    """Plain DDP and DeepSpeed ZeRO-2/3, 2 processes on CPU over gloo."""
    if strategy != "none":
        pytest.importorskip("deepspeed")
    tmp, env, base = prepared
    out = subprocess.run(
        [
            *torchrun(2),
            "-m",
            "medlava",
            "sft",
            *base,
            f"run_id=ddp-{strategy}",
            "sft.init_from=none",
            "sft.epochs=3",
            "sft.batch_size=4",
            f"sft.deepspeed={strategy}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp / "runs" / "tiny" / "sft" / f"ddp-{strategy}"
    info = json.loads((run / "COMPLETE.json").read_text())
    assert info["world_size"] == 2
    assert json.loads((run / "train_info.json").read_text()) | info == info  # train_info.json, then COMPLETE.json
    assert (info["attention"], info["kernels"], info["compiled_blocks"]) == ("sdpa", "none", 0)
    assert info["optimizer"] == ("torch AdamW (fused)" if strategy == "none" else "deepspeed AdamW")
    losses = _losses(run)
    first, last = [losses[s] for s in sorted(losses)[:3]], [losses[s] for s in sorted(losses)[-3:]]
    assert sum(last) < sum(first)

    from medlava.config import load_config
    from medlava.models.llava import load_for_inference

    cfg = load_config(TINY, [f"data.root={tmp / 'ham'}"])
    os.environ["MEDLAVA_CACHE"] = env["MEDLAVA_CACHE"]
    model, _, _ = load_for_inference(cfg.model, run / info["checkpoint"], torch.float32)
    trained = _final_weights(run)
    proj = {k.split("modules_to_save.default.")[1]: v for k, v in trained.items() if "modules_to_save" in k}
    state = model.model.multi_modal_projector.state_dict()
    assert proj.keys() == state.keys()
    for k in proj:
        torch.testing.assert_close(state[k], proj[k])


def _torchrun(prepared, procs: int, run_id: str, *extra) -> subprocess.CompletedProcess:
    tmp, env, base = prepared
    launcher = [sys.executable] if procs == 1 else torchrun(procs)
    return subprocess.run(
        [*launcher, "-m", "medlava", "sft", *base, f"run_id={run_id}", "sft.init_from=none", *extra],
        env=env,
        capture_output=True,
        text=True,
    )


def test_keep_last_leaves_the_newest_checkpoints(prepared):
    run = _sft(prepared, "keep", "sft.max_steps=5", "sft.save_every=1", "sft.keep_last=2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert json.loads((run / "COMPLETE.json").read_text())["checkpoint"] == "checkpoints/step-000005"


# One global batch of 6 (batch_size 1, grad_accum 6 / 3 / 2 on 1 / 2 / 3 processes): the same samples make each step
# on any number of processes, so the loss curve is the same; tiny's LoRA has no dropout (no random draws to differ).
GLOBAL_6 = {1: "sft.grad_accum=6", 2: "sft.grad_accum=3", 3: "sft.grad_accum=2"}
ELASTIC = ("sft.batch_size=1", "sft.max_steps=6", "sft.save_every=3", "sft.keep_last=null")


def test_a_ddp_lora_checkpoint_resumes_on_fewer_or_more_processes(prepared):
    """Saved under 2 processes at step 3; resumed under 1 and under 3 from there: the same losses for steps 4-6 as
    the straight 2-process run, and the same final weights."""
    tmp = prepared[0]
    out = _torchrun(prepared, 2, "elastic", *ELASTIC, GLOBAL_6[2])
    assert out.returncode == 0, out.stderr[-3000:]
    straight = tmp / "runs" / "tiny" / "sft" / "elastic"
    for procs in (1, 3):
        run = straight.with_name(f"elastic-on-{procs}")
        shutil.copytree(straight, run)
        shutil.rmtree(run / "checkpoints" / "step-000006")
        (run / "COMPLETE.json").unlink()
        out = _torchrun(prepared, procs, run.name, *ELASTIC, GLOBAL_6[procs])
        assert out.returncode == 0, out.stderr[-3000:]
        assert "was saved by 2 process(es), resumed by" in out.stderr and "at step 3 of 6" in out.stderr
        la, lb = _losses(straight), _losses(run)
        assert sorted(lb) == list(range(1, 7))
        assert [lb[s] for s in (4, 5, 6)] == pytest.approx([la[s] for s in (4, 5, 6)], rel=1e-4), procs
        a, b = _final_weights(straight), _final_weights(run)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_zero3_checkpoint_is_not_resumed_on_another_number_of_processes(prepared):
    pytest.importorskip("deepspeed")
    tmp = prepared[0]
    out = _torchrun(prepared, 1, "zero3-elastic", "sft.batch_size=4", "sft.max_steps=1", "sft.deepspeed=zero3")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp / "runs" / "tiny" / "sft" / "zero3-elastic"
    (run / "COMPLETE.json").unlink()
    out = _torchrun(prepared, 2, "zero3-elastic", "sft.batch_size=4", "sft.max_steps=2", "sft.deepspeed=zero3")
    assert out.returncode != 0
    assert (
        f"medlava sft (rank 0): {run / 'checkpoints' / 'step-000001'} holds DeepSpeed ZeRO state sharded over 1 "
        "process(es), one optimizer shard per rank, and cannot be resumed by 2: resume with 1 process(es)" in out.stderr
    ), out.stderr[-3000:]
