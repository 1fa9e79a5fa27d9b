"""launch/submit.py against a real SLURM cluster (.ci/slurm-up.sh: two nodes n1/n2, 1 CPU each, no GPUs,
no sacct): 2-node torchrun training, the pre-timeout signal with requeue and exact resume, an infer job
array, the medical VQA suite (prepare job, answering array, merge), a pipeline in dependency order, the plain sbatch
scripts, monitoring, and refusals."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY, TINY_PRETRAIN
from medlava.cluster.monitor import job_states, scontrol_fields, wait
from medlava.data.samples import read_samples
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sinfo") is None,
        reason="no SLURM client (sinfo) on PATH: start the local cluster with `bash .ci/slurm-up.sh` (as root)",
    ),
]

SUBMIT = ROOT / "launch" / "submit.py"
PY = sys.executable
WAIT = 300  # seconds per wait; each job here takes 5-30 s on the CI cluster
# The USR2 test signals once step 8 is saved: the other 152 steps (about 5 s at the tiny model's 30 steps/s on an
# idle machine) are the margin for the signal's way through slurmd, the batch script, torchrun and the workers.
STEPS = 160
TRAIN = ["sft.init_from=none", f"sft.max_steps={STEPS}", "sft.batch_size=4", "sft.save_every=8", "sft.keep_last=null"]


@dataclass
class Site:
    tmp: Path
    env: dict[str, str]
    base: list[str]

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"

    def submit(
        self, *args: str, check: bool = True, root: Path | None = None, config: Path = TINY
    ) -> subprocess.CompletedProcess:
        cmd = [
            PY,
            str(SUBMIT),
            *args,
            "--config",
            str(config),
            "--executor",
            "slurm",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
            "--output-root",
            str(root or self.runs),
            *self.base,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=self.tmp, env=self.env)
        if check:
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out


def record(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "slurm" / "submissions.json").read_text())


def show(job_id: str) -> dict[str, str]:
    return scontrol_fields(
        subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / json.loads((run / "COMPLETE.json").read_text())["checkpoint"]
    return load_file(str(ckpt / "trainable.safetensors"))


def losses(run: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def node_log(run: Path, job_id: str, task: int) -> str:
    return (run / "slurm" / f"{job_id}_{task}_log.err").read_text(errors="replace")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    up = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
    if up.returncode != 0 or not up.stdout.strip():
        pytest.fail(
            f"sinfo is on PATH but the cluster does not answer ({up.stderr.strip()}): "
            "run `bash .ci/slurm-up.sh` as root"
        )
    tmp = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["MEDLAVA_CACHE"] = str(tmp / "cache")  # jobs inherit the submitting environment (sbatch --export=ALL)
    base = [f"data.root={tmp / 'ham'}", "data.synthetic.n_lesions=40"]
    local = ["--config", str(TINY), f"output_root={tmp / 'runs'}", *base]
    subprocess.run([PY, "-m", "medlava", "prepare", *local, "run_id=p"], env=env, check=True, capture_output=True)
    # The tiny model cache, built once here: two ranks building it at once can race (models/tiny.py).
    subprocess.run(
        [
            PY,
            "-c",
            "from medlava.config import load_config; from medlava.models.tiny import "
            f"tiny_checkpoint; tiny_checkpoint(load_config({str(TINY)!r}).model.tiny)",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return Site(tmp, env, base)


@pytest.fixture(scope="module")
def two_node_sft(site: Site) -> tuple[Path, str, float, str]:
    """(run, job id, seconds, what --dry-run printed before the submission)."""
    t0 = time.time()
    dry = site.submit("sft", "--nodes", "2", "--gpus", "0", "run_id=mn", *TRAIN, "--dry-run").stdout
    site.submit("sft", "--nodes", "2", "--gpus", "0", "run_id=mn", *TRAIN)
    run = site.runs / "tiny" / "sft" / "mn"
    (entry,) = record(run)
    wait([entry["job_id"]], WAIT)
    return run, entry["job_id"], time.time() - t0, dry


def test_two_node_sft_trains_two_torchrun_processes_and_completes(site, two_node_sft):
    run, job_id, seconds, dry = two_node_sft
    info = show(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    for task, node in ((0, "n1"), (1, "n2")):  # one torchrun per node, meeting on the first node
        log = node_log(run, job_id, task)
        assert f"[medlava node task {node} (node {task} of 2)]" in log
        assert f"--nnodes=2 --node_rank={task} --rdzv_backend=c10d --rdzv_endpoint=n1:" in log
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert json.loads((run / "train_info.json").read_text())["world_size"] == 2
    assert (run / "checkpoints" / f"step-{STEPS:06d}" / "trainable.safetensors").exists()
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    # The run directory records the job: id, the sbatch script submitit wrote, the command lines.
    (entry,) = record(run)
    script = Path(entry["sbatch_script"])
    assert script == run / "slurm" / f"{job_id}_submission.sh" and script.exists()
    assert entry["submit_command"].startswith(PY) and "sft" in entry["submit_command"]
    assert "--nnodes=2" in entry["task_command"]
    # --dry-run printed exactly that script (before the submission: the finished run now refuses another launch).
    printed = dry.split("# ---- job 1/1: sft", 1)[1].split("\n", 1)[1].split("\n# each of the 2 srun tasks")[0]
    assert printed == script.read_text().rstrip()
    # status and logs find the run by its id
    status = subprocess.run(
        [PY, str(SUBMIT), "status", "mn", "--output-root", str(site.runs)], capture_output=True, text=True, check=True
    ).stdout
    assert f"job {job_id}" in status and "COMPLETED" in status
    logs = subprocess.run(
        [PY, str(SUBMIT), "logs", "mn", "--job", "sft", "--task", "1", "--output-root", str(site.runs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "[medlava node task n2 (node 1 of 2)]" in logs
    print(f"2-node sft: {seconds:.0f} s from submission to COMPLETED")


def test_usr2_mid_training_requeues_and_resumes_to_the_same_weights(site, two_node_sft):
    """SLURM's pre-timeout signal (what --signal=USR2@N sends), by hand: the workers checkpoint, the job
    requeues itself, runs again with the same run_id, resumes, and ends where an uninterrupted run ends."""
    t0 = time.time()
    site.submit("sft", "--nodes", "2", "--gpus", "0", "run_id=sig", *TRAIN)
    run = site.runs / "tiny" / "sft" / "sig"
    job_id = record(run)[0]["job_id"]
    deadline = time.time() + WAIT
    while not (run / "checkpoints" / "step-000008").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert show(job_id)["JobState"] == "RUNNING", "the job ended before it could be signalled"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait([job_id], WAIT)
    info = show(job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    head = node_log(run, job_id, 0)
    assert "SIGUSR2: stopping the workers (SIGUSR2 ->" in head
    assert f"requeued job {job_id}" in head and "workers stopped (exit 1)" in head  # torchrun survived USR2
    assert f"job {job_id} restart 1:" in head and f"job {job_id} restart 1:" in node_log(run, job_id, 1)
    logs = head + node_log(run, job_id, 1)
    stopped = int(logs.split("checkpoint saved at step ")[1].split()[0])
    assert 8 <= stopped < STEPS and (run / "checkpoints" / f"step-{stopped:06d}").exists()
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped:06d}'} at step {stopped} of {STEPS}" in logs
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    a, b = final_weights(two_node_sft[0]), final_weights(run)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    print(f"USR2 + requeue + resume: {time.time() - t0:.0f} s, stopped at step {stopped}")


def test_two_node_pretrain_gathers_features_across_the_nodes(site):
    """The contrastive stage as a 2-node job: one torchrun per node, features gathered with gradients over both."""
    site.submit(
        "pretrain",
        "--nodes",
        "2",
        "--gpus",
        "0",
        "run_id=clip",
        "pretrain.max_steps=6",
        "pretrain.batch_size=8",
        config=TINY_PRETRAIN,
    )
    run = site.runs / "tiny" / "pretrain" / "clip"
    (entry,) = record(run)
    wait([entry["job_id"]], WAIT)
    info = show(entry["job_id"])
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", info
    for task in (0, 1):
        assert f"--nnodes=2 --node_rank={task} --rdzv_backend=c10d" in node_log(run, entry["job_id"], task)
    train_info = json.loads((run / "train_info.json").read_text())
    assert train_info["world_size"] == 2 and train_info["contrastive_batch"] == 16
    assert sorted(losses(run)) == list(range(1, 7))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["family"] == "classification" and metrics["retrieval"]["n_images"] > 0
    assert (run / "predictions.csv").exists()


def test_infer_chunks_run_as_one_job_array_and_merge_covers_every_sample_once(site, two_node_sft):
    t0 = time.time()
    site.submit("infer", "--chunks", "4", "--array-parallelism", "2", "run_id=mn")
    run = site.runs / "tiny" / "infer" / "mn"
    chunks, merge = record(run)
    assert (chunks["name"], chunks["array"], merge["name"]) == ("infer-chunks", 4, "infer-merge")
    assert merge["after"] == {"infer-chunks": chunks["job_id"]}
    wait([chunks["job_id"], merge["job_id"]], WAIT)
    tasks = job_states(chunks["job_id"])  # one job id, four array tasks
    assert sorted(t.job_id for t in tasks) == [f"{chunks['job_id']}_{i}" for i in range(4)]
    assert all(t.state == "COMPLETED" for t in tasks) and show(merge["job_id"])["JobState"] == "COMPLETED"
    assert "#SBATCH --array=0-3%2" in Path(chunks["sbatch_script"]).read_text()
    for i in range(4):
        assert f"--chunk-idx {i}" in (run / "slurm" / f"{chunks['job_id']}_{i}_0_log.err").read_text()
        assert (run / "chunks" / f"answers-{i:04d}-of-0004.jsonl").exists()
    test_ids = [s["id"] for s in read_samples(site.runs / "tiny" / "prepare" / "p" / "test.jsonl")]
    pred = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert sorted(pred["id"]) == sorted(test_ids) and pred["id"].is_unique
    assert (run / "COMPLETE.json").exists()
    status = subprocess.run([PY, str(SUBMIT), "status", str(run)], capture_output=True, text=True, check=True).stdout
    assert "(array of 4)" in status and "COMPLETED x4" in status
    print(f"infer array of 4 + merge: {time.time() - t0:.0f} s")


def test_plain_sbatch_scripts_run_the_same_array_and_merge(site, two_node_sft):
    sbatch = ROOT / "jobs" / "sbatch"
    common = [str(TINY), "plain", f"output_root={site.runs}", *site.base, f"infer.checkpoint={two_node_sft[0]}"]
    env = {**site.env, "PYTHON": PY}

    def sbatch_id(*args: str) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", "--cpus-per-task=1", f"--chdir={site.tmp}", *args],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        return out.stdout.strip().split(";")[0]

    array = sbatch_id("--array=0-1%2", str(sbatch / "infer_array.sbatch"), *common)
    merge = sbatch_id(
        f"--dependency=afterok:{array}",
        str(sbatch / "stage.sbatch"),
        "infer",
        *common,
        "infer.chunks=2",
        "--merge-only",
    )
    states = wait([array, merge], WAIT)
    assert [t.state for t in states[array]] == ["COMPLETED"] * 2 and states[merge][0].state == "COMPLETED"
    run = site.runs / "tiny" / "infer" / "plain"
    test_ids = [s["id"] for s in read_samples(site.runs / "tiny" / "prepare" / "p" / "test.jsonl")]
    pred = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert sorted(pred["id"]) == sorted(test_ids) and pred["id"].is_unique
    assert sorted(p.name for p in (run / "chunks").glob("answers-*")) == [
        f"answers-{i:04d}-of-0002.{kind}" for i in range(2) for kind in ("jsonl", "settings.json")
    ]


def test_pipeline_submits_without_blocking_and_runs_in_dependency_order(site, two_node_sft):
    """A fresh output root (so prepare is needed) whose path holds spaces, quotes, `;` and `$(...)`: it must
    reach SLURM and the jobs as data."""
    weird = site.tmp / 'we\'ird dir; $(touch INJECTED) "q"'
    weird.mkdir()
    recipe = weird / "my recipe.yaml"
    shutil.copy(TINY, recipe)
    t0 = time.time()
    out = site.submit(
        "pipeline",
        "run_id=pl",
        "--chunks",
        "2",
        "align.max_steps=4",
        "sft.max_steps=4",
        "align.batch_size=4",
        "sft.batch_size=4",
        "eval.n_bootstrap=20",
        config=recipe,
        root=weird / "runs",
    )
    submit_s = time.time() - t0
    runs = weird / "runs" / "tiny"
    stage_of = {
        "prepare": "prepare",
        "align": "align",
        "sft": "sft",
        "infer-chunks": "infer",
        "infer-merge": "infer",
        "eval": "eval",
    }
    names = list(stage_of)
    entries = {e["name"]: e for stage in dict.fromkeys(stage_of.values()) for e in record(runs / stage / "pl")}
    assert list(entries) == names
    ids = [entries[n]["job_id"] for n in names]
    assert all(i in out.stdout for i in ids)  # printed
    assert not all(t.done for t in job_states(ids[-1])), "submit must return before the chain has run"
    for prev, name in zip(names, names[1:]):
        assert entries[name]["after"] == {prev: entries[prev]["job_id"]}
    wait(ids, WAIT)
    ends: dict[str, str] = {}
    for name, job_id in zip(names, ids):
        tasks = [
            scontrol_fields(line)
            for line in subprocess.run(
                ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
            ).stdout.splitlines()
        ]
        assert {t["JobState"] for t in tasks} == {"COMPLETED"}, (name, tasks)
        if ends:  # starts only after the job before it ended (ISO times compare as text)
            assert min(t["StartTime"] for t in tasks) >= list(ends.values())[-1], name
        ends[name] = max(t["EndTime"] for t in tasks)
        assert tasks[0]["Comment"] == str(runs / stage_of[name] / "pl")  # the path reached SLURM intact
        assert (runs / stage_of[name] / "pl" / "COMPLETE.json").exists()
    assert json.loads((runs / "eval" / "pl" / "metrics.json").read_text())["n"] > 0
    assert not list(site.tmp.rglob("INJECTED")) and not (ROOT / "INJECTED").exists()
    print(f"pipeline of 6 jobs: submitted in {submit_s:.1f} s, done after {time.time() - t0:.0f} s")


def test_suite_runs_as_a_prepare_job_an_answering_array_and_a_merge(site):
    t0 = time.time()
    cmd = [
        PY,
        str(SUBMIT),
        "suite",
        "--config",
        str(ROOT / "jobs" / "configs" / "tiny_suite.yaml"),
        "--executor",
        "slurm",
        "--cpus-per-task",
        "1",
        "--time",
        "10",
        "--output-root",
        str(site.runs),
        f"data.root={site.tmp / 'medvqa'}",
        "run_id=su",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=site.tmp, env=site.env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = site.runs / "tiny-suite" / "suite" / "su"
    prepare, chunks, merge = record(run)
    assert [e["name"] for e in (prepare, chunks, merge)] == ["suite-prepare", "suite-chunks", "suite-merge"]
    assert chunks["array"] == 2 and chunks["after"] == {"suite-prepare": prepare["job_id"]}
    assert merge["after"] == {"suite-chunks": chunks["job_id"]}
    wait([prepare["job_id"], chunks["job_id"], merge["job_id"]], WAIT)
    tasks = job_states(chunks["job_id"])
    assert sorted(t.job_id for t in tasks) == [f"{chunks['job_id']}_{i}" for i in range(2)]
    assert all(t.state == "COMPLETED" for t in tasks) and show(merge["job_id"])["JobState"] == "COMPLETED"
    board = pd.read_csv(run / "leaderboard.csv")
    assert (
        set(board["benchmark"]) == {"vqa_rad", "slake", "path_vqa", "pmc_vqa", "omnimedvqa", "medxpertqa", "mmmu_med"}
        and board["n"].sum() > 0
    )
    for bench in board["benchmark"].unique():  # each benchmark's answers from both tasks, merged exactly once
        assert len(list((run / bench / "chunks").glob("answers-*-of-0002.jsonl"))) == 2
        assert pd.read_csv(run / bench / "predictions.csv", dtype=str)["id"].is_unique
    print(f"suite of 7 benchmarks, prepare + array of 2 + merge: {time.time() - t0:.0f} s")


def test_cancel_stops_a_run_that_is_still_queued(site):
    site.submit("prepare", "run_id=later", 'cluster.sbatch_extra=["--begin=now+3600"]')
    run = site.runs / "tiny" / "prepare" / "later"
    (entry,) = record(run)
    assert "#SBATCH --begin=now+3600" in Path(entry["sbatch_script"]).read_text()
    assert show(entry["job_id"])["JobState"] == "PENDING"
    out = subprocess.run(
        [PY, str(SUBMIT), "cancel", "later", "--output-root", str(site.runs)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"cancelled {entry['job_id']}" in out.stdout
    wait([entry["job_id"]], 60)
    assert show(entry["job_id"])["JobState"] == "CANCELLED"


def test_a_failing_two_node_job_ends_each_node_log_with_its_first_error(site):
    """Both ranks fail at start (data.samples names a folder that exists, so the launcher takes it, but holds
    nothing prepared). Each node's log ends with the error its rank printed, not with the hundreds of lines torch
    prints about the rendezvous the other node left."""
    empty = site.tmp / "not-prepared"
    empty.mkdir(exist_ok=True)
    site.submit("sft", "--nodes", "2", "--gpus", "0", "run_id=fails", f"data.samples={empty}", *TRAIN)
    run = site.runs / "tiny" / "sft" / "fails"
    (entry,) = record(run)
    wait([entry["job_id"]], WAIT)
    assert show(entry["job_id"])["JobState"] == "FAILED"
    ends = {}
    for task in (0, 1):
        log = node_log(run, entry["job_id"], task)
        assert "frame #" not in log and "TCPStore.cpp" not in log and "Exception raised from" not in log, log
        ends[task] = [line for line in log.splitlines() if line.startswith("RuntimeError: ")][-1]
        assert ends[task].startswith(f"RuntimeError: sft failed on n{task + 1} (node {task} of 2) (exit "), log
    # Each rank prints its error unless the other node's failure stopped it first: then its log says that. (c10d
    # hands out the ranks, so node 0 may run rank 1.)
    own = {
        t
        for t, end in ends.items()
        if re.search(
            rf"\(exit -?\d+\): medlava sft \(rank [01]\): {re.escape(str(empty))} "
            r"holds no dataset\.json: is it a `prepare` run directory\?$",
            end,
        )
    }
    assert own, ends
    for task in set(ends) - own:
        assert ends[task].endswith(
            ("if another node's log ends with an error, that one came first", "no error was printed; see the log above")
        ), ends


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gpus", "1"], "--gpus 1 (cluster.gpus_per_node): partition debug has at most 0 GPUs per node"),
        (["--nodes", "3"], "sft needs 3 nodes with 0 GPUs and 1 CPUs; partition debug has 2 such nodes"),
        (["--partition", "gpu"], "partition 'gpu' does not exist; sinfo lists: debug"),
        (["--mem", "100T"], "cluster.mem=100T: nodes of partition debug have at most"),
    ],
)
def test_submission_the_partition_cannot_run_is_refused_before_the_queue(site, args, needle):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    out = site.submit("sft", *args, "run_id=refused", check=False)
    assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert not (site.runs / "tiny" / "sft" / "refused").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_stage_check_runs_doctor_on_a_node_of_the_partition_and_prints_its_screen(site):
    out = site.submit("sft", "--check", "--gpus", "0", "run_id=chk")
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("==> medlava doctor on n"))
    assert "COMPLETED" in lines[header]
    screen = lines[header + 1 :]
    assert screen[0].startswith("OK    python") and screen[-1].endswith(" 0 FAIL")
    assert any(line.startswith("WARN  slurm") and "debug" in line for line in screen)  # asked from the node
    (entry,) = record(site.runs / "tiny" / "doctor" / "chk")
    assert entry["name"] == "doctor" and entry["nodes"] == 1


def test_dry_run_renders_a_gpu_recipe_for_its_own_cluster_and_warns_what_this_one_lacks(tmp_path):
    """This cluster (partition debug: 1 CPU, no GPUs per node) cannot run llava_med_sft.yaml's 2 x 8-GPU job; a
    dry run still prints it as the recipe configures it, with what submitting here would refuse as warnings."""
    cmd = [
        PY,
        str(SUBMIT),
        "sft",
        "--config",
        str(ROOT / "jobs" / "configs" / "llava_med_sft.yaml"),
        "--nodes",
        "2",
        "--gpus",
        "8",
        "--output-root",
        str(tmp_path / "runs"),
        "--executor",
        "slurm",
    ]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    prepare = tmp_path / "runs" / "llava-med-sft" / "prepare"
    assert dry.stderr == (
        "submit: warning (submitting would refuse this): partition 'gpu' does not exist; "
        "sinfo lists: debug\n"
        "submit: warning (submitting would refuse this): data.samples=latest: no complete `prepare` "
        f"run under {prepare}: run `python launch/submit.py prepare --config ...` first, or give a "
        "path\n"
    )
    assert "; 2 warning(s) (stderr)" in dry.stdout
    sbatch = dict(
        line.removeprefix("#SBATCH --").partition("=")[::2]
        for line in dry.stdout.splitlines()
        if line.startswith("#SBATCH --")
    )
    assert {k: sbatch[k] for k in ("partition", "nodes", "gpus-per-node", "mem-per-gpu", "cpus-per-task", "time")} == {
        "partition": "gpu",
        "nodes": "2",
        "gpus-per-node": "8",
        "mem-per-gpu": "60G",
        "cpus-per-task": "32",
        "time": "1-00:00:00",
    }  # the limit as SLURM writes it, not 1440
    here = subprocess.run([*cmd, "--partition", "debug", "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert here.returncode == 0 and "--partition=debug" in here.stdout
    assert "--gpus 8 (cluster.gpus_per_node): partition debug has at most 0 GPUs per node" in here.stderr
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("submit: refused: partition 'gpu' does not exist")
    assert not (tmp_path / "runs").exists()
