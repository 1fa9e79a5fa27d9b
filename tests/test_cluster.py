"""The cluster module without a cluster: command lines, dry-run sbatch scripts (single-node, multi-node,
array, GPUs), quoting, refusals, and the node task's signal path on a real local torchrun."""

import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, complete_runs
from medlava.cluster.jobs import Rendezvous, stage_jobs, worker_argv
from medlava.cluster.logfilter import LogFilter
from medlava.cluster.node_task import descendants, is_worker, port_for
from medlava.cluster.sinfo import parse_gres
from medlava.cluster.slurm import (
    display_join,
    extra_parameters,
    minutes,
    render,
    sbatch_parameters,
)
from medlava.config import load_config

SUBMIT = ROOT / "launch" / "submit.py"
PY = sys.executable


def submit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(SUBMIT), *args], capture_output=True, text=True, cwd=cwd)


def scripts(dry_run_stdout: str) -> list[list[str]]:
    """The dry run's per-job sections: [sbatch script lines..., comment lines, command]."""
    sections = dry_run_stdout.split("# ---- job ")[1:]
    return [s.splitlines()[1:] for s in sections]


def sbatch_options(section: list[str]) -> dict[str, str]:
    """`#SBATCH --key=value` lines read the way sbatch reads them (shell-like quoting)."""
    out = {}
    for line in section:
        if line.startswith("#SBATCH "):
            key, _, value = shlex.split(line[len("#SBATCH ") :])[0].partition("=")
            out[key] = value
    return out


def test_worker_argv_single_standalone_and_multi_node():
    assert worker_argv(["sft", "--config", "c"], python="py") == ["py", "-m", "medlava", "sft", "--config", "c"]
    assert worker_argv(["sft"], 1, 4, "py") == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=4",
        "--standalone",
        "-m",
        "medlava",
        "sft",
    ]
    with pytest.raises(ValueError, match="needs a rendezvous host: submit it with --executor slurm"):
        worker_argv(["sft"], 2, 1, "py")
    argv = worker_argv(["sft"], 2, 8, "py", Rendezvous("1", "gpu001", "20042", "42"))
    assert argv[:4] == ["py", "-m", "torch.distributed.run", "--nproc_per_node=8"]
    assert {
        "--nnodes=2",
        "--node_rank=1",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu001:20042",
        "--rdzv_id=42",
    } <= set(argv)
    assert argv[-3:] == ["-m", "medlava", "sft"]
    assert port_for("42") == port_for("42") != port_for("43") and 20000 <= port_for("123456789") < 60000


def test_stage_jobs_chain_training_shape_and_infer_array():
    cfg = load_config(TINY, ["cluster.nodes=2", "cluster.gpus_per_node=0", "infer.chunks=4", "run_id=r"])
    jobs = stage_jobs(["align", "sft", "infer", "eval"], "c.yaml", ["run_id=r"], cfg)
    assert [j.name for j in jobs] == ["align", "sft", "infer-chunks", "infer-merge", "eval"]
    assert [j.after for j in jobs] == [[], ["align"], ["sft"], ["infer-chunks"], ["infer-merge"]]
    sft, chunks, merge = jobs[1], jobs[2], jobs[3]
    assert (sft.nodes, sft.procs_per_node) == (2, 1)  # CPU: one process per node, two in all
    assert chunks.array == 4 and chunks.nodes == 1 and chunks.task_args(3)[-2:] == ["--chunk-idx", "3"]
    assert merge.args[-1] == "--merge-only" and merge.array is None


@pytest.mark.parametrize(
    "text, mins",
    [("30", 30), ("90:30", 91), ("04:00:00", 240), ("1-00", 1440), ("2-03:04", 2 * 1440 + 184), ("0-00:00:59", 1)],
)
def test_slurm_time_formats(text, mins):
    assert minutes(text) == mins


@pytest.mark.parametrize(
    "gres, n, kind",
    [
        ("(null)", 0, ""),
        ("gpu:8", 8, ""),
        ("gpu", 1, ""),
        ("gpu:a100:4(S:0-1)", 4, "a100"),
        ("gpu:a100:4,gpu:v100:2", 6, "a100+v100"),
        ("gpu:a100:4(S:0,1),gpu:v100:2", 6, "a100+v100"),
        ("craynetwork:4,gpu:h100:8", 8, "h100"),
        ("gpu:a100:8(S:0-1),shard:8", 8, "a100"),
        ("shard:4,gpu:2", 2, ""),
    ],
)
def test_gres_counts_every_gpu_of_a_node(gres, n, kind):
    """One parser for doctor and the executor: a node with 4 A100s and 2 V100s has 6 GPUs (doctor said 4)."""
    assert parse_gres(gres) == (n, kind)


def test_sbatch_extra_is_parsed_and_managed_options_are_refused():
    assert extra_parameters(["--reservation=r 1", "#SBATCH --hint=nomultithread", "--overcommit"]) == {
        "reservation": "r 1",
        "hint": "nomultithread",
        "overcommit": True,
    }
    with pytest.raises(ValueError, match="sets --nodes, which medlava sets itself"):
        extra_parameters(["--nodes=3"])
    with pytest.raises(ValueError, match="is not `--option=value`"):
        extra_parameters(["reservation=r1"])


def test_display_join_keeps_placeholders_expandable_and_quotes_the_rest():
    line = display_join(["a b", "--node_rank=${SLURM_NODEID}", "x;y", "--e=${HEAD}:${PORT}"])
    assert line == '\'a b\' --node_rank="${SLURM_NODEID}" \'x;y\' --e="${HEAD}":"${PORT}"'
    out = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {line}"],
        capture_output=True,
        text=True,
        env={"SLURM_NODEID": "1", "HEAD": "n1", "PORT": "2"},
    ).stdout.splitlines()
    assert out == ["a b", "--node_rank=1", "x;y", "--e=n1:2"]


def test_dry_run_single_node_has_no_torchrun(tmp_path):
    complete_runs(tmp_path / "runs", "prepare", "align")
    out = submit(
        "sft",
        "--config",
        str(TINY),
        "--executor",
        "slurm",
        "--dry-run",
        "--cpus-per-task",
        "1",
        "--output-root",
        str(tmp_path / "runs"),
        "run_id=r1",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (section,) = scripts(out.stdout)
    opts = sbatch_options(section)
    assert opts["--nodes"] == "1" and opts["--ntasks-per-node"] == "1" and "--gpus-per-node" not in opts
    assert opts["--signal"] == "USR2@120" and opts["--open-mode"] == "append" and "--requeue" in opts
    assert opts["--output"] == f"{tmp_path}/runs/tiny/sft/r1/slurm/%j_0_log.out"
    srun = shlex.split(next(line for line in section if line.startswith("srun ")))
    assert srun[-5:] == [PY, "-u", "-m", "submitit.core._submit", f"{tmp_path}/runs/tiny/sft/r1/slurm"]
    assert "--kill-on-bad-exit=1" in srun
    command = shlex.split(section[-1])
    assert command[:4] == [PY, "-m", "medlava", "sft"] and "torch.distributed.run" not in command
    assert (command[command.index("--config") + 1]) == str(TINY)
    assert not (tmp_path / "runs" / "tiny" / "sft").exists(), "a dry run must not create run directories"


def test_dry_run_multi_node_runs_one_torchrun_per_node(tmp_path):
    complete_runs(tmp_path, "prepare", "align")
    out = submit(
        "sft",
        "--config",
        str(TINY),
        "--executor",
        "slurm",
        "--dry-run",
        "--nodes",
        "2",
        "--gpus",
        "0",
        "--cpus-per-task",
        "1",
        "--output-root",
        str(tmp_path),
        "run_id=r2",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (section,) = scripts(out.stdout)
    opts = sbatch_options(section)
    assert opts["--nodes"] == "2" and opts["--ntasks-per-node"] == "1"
    assert any('HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in line for line in section)
    assert section[-1].startswith(
        f"{PY} -m torch.distributed.run --nproc_per_node=1 --nnodes=2 "
        '--node_rank="${SLURM_NODEID}" --rdzv_backend=c10d '
        '--rdzv_endpoint="${HEAD}":"${PORT}" --rdzv_id="${SLURM_JOB_ID}" -m medlava sft '
    )


def complete_sft_run(output_root: Path, run_id: str) -> Path:
    return complete_runs(output_root, "sft", run_id=run_id, result='{"checkpoint": "checkpoints/step-000001"}')[0]


def test_dry_run_array_then_dependent_merge(tmp_path):
    complete_runs(tmp_path, "prepare")
    sft = complete_sft_run(tmp_path, "s1")
    out = submit(
        "infer",
        "--config",
        str(TINY),
        "--executor",
        "slurm",
        "--dry-run",
        "--chunks",
        "4",
        "--array-parallelism",
        "2",
        "--cpus-per-task",
        "1",
        "--output-root",
        str(tmp_path),
        "run_id=r3",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    array, merge = scripts(out.stdout)
    a, m = sbatch_options(array), sbatch_options(merge)
    assert a["--array"] == "0-3%2" and a["--output"].endswith("/slurm/%A_%a_0_log.out")
    assert array[-1].endswith(f'infer.chunks=4 infer.checkpoint={sft} --chunk-idx "${{SLURM_ARRAY_TASK_ID}}"')
    assert "--array" not in m and m["--dependency"] == "afterok:<infer-chunks job id>"
    assert m["--kill-on-invalid-dep"] == "yes" and merge[-1].endswith(f"infer.checkpoint={sft} --merge-only")


def test_chunks_sets_the_array_key_of_the_stage_given(tmp_path):
    """--chunks is infer.chunks for infer and for the suite, which answers with infer's settings (Stage.keys_in)."""
    sft = complete_sft_run(tmp_path, "s1")
    for stage in ("infer", "suite"):
        out = submit(stage, "--config", str(TINY), "--executor", "local", "--dry-run", "--chunks", "3",
                     "--output-root", str(tmp_path), "run_id=k", cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr
        tasks = [line for line in out.stdout.splitlines() if " --chunk-idx 0" in line]
        assert len(tasks) == 1 and f"infer.chunks=3 infer.checkpoint={sft} " in tasks[0], out.stdout[-2000:]
        assert "# array of 3" in tasks[0]


def test_latest_checkpoint_is_resolved_once_at_submit_time(tmp_path):
    """Every array task and the merge answer with the sft run that was newest at submission, whatever completes
    while they run; a launch that trains its own sft run pins that one."""
    complete_runs(tmp_path, "prepare")
    complete_sft_run(tmp_path, "older")
    time.sleep(0.05)
    newest = complete_sft_run(tmp_path, "newer")
    out = submit(
        "infer",
        "--config",
        str(TINY),
        "--executor",
        "slurm",
        "--dry-run",
        "--chunks",
        "3",
        "--cpus-per-task",
        "1",
        "--output-root",
        str(tmp_path),
        "run_id=i",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(section[-1]) for section in scripts(out.stdout)]
    assert [c.count(f"infer.checkpoint={newest}") for c in commands] == [1, 1]  # the array's and the merge's
    assert f"checkpoint: {newest}" in out.stdout  # the resolved config says so too
    chain = submit(
        "pipeline",
        "--config",
        str(TINY),
        "--executor",
        "slurm",
        "--dry-run",
        "--cpus-per-task",
        "1",
        "--output-root",
        str(tmp_path),
        "run_id=p",
        cwd=tmp_path,
    )
    assert chain.returncode == 0, chain.stderr
    assert all(f"infer.checkpoint={tmp_path / 'tiny' / 'sft' / 'p'}" in s[-1] for s in scripts(chain.stdout))
    # with no sft run, submitting is refused; a dry run shows the tasks unpinned (the recipe's `latest`), and warns
    empty = ["--config", str(TINY), "--cpus-per-task", "1", "--output-root", str(tmp_path / "empty")]
    refused = submit("infer", *empty, "--executor", "local", cwd=tmp_path)
    assert (
        refused.returncode == 2 and "submit: refused: infer.checkpoint=latest: no complete `sft` run" in refused.stderr
    )
    dry = submit("infer", *empty, "--executor", "slurm", "--dry-run", cwd=tmp_path)
    tasks = scripts(dry.stdout)
    assert dry.returncode == 0 and len(tasks) == 2 and not any("infer.checkpoint=" in s[-1] for s in tasks)
    assert (
        "submit: warning (submitting would refuse this): infer.checkpoint=latest: no complete `sft` run" in dry.stderr
    )


def test_gpu_multi_node_script_and_environment():
    """The 8-GPU shape the issue names, rendered without asking a cluster (no sinfo check here)."""
    cfg = load_config(
        TINY,
        [
            "cluster.nodes=2",
            "cluster.gpus_per_node=8",
            "cluster.cpus_per_task=64",
            "cluster.partition=gpu",
            "cluster.account=proj",
            "cluster.qos=high",
            "cluster.mem=500G",
            "cluster.constraint=a100",
            "cluster.exclusive=true",
            "cluster.time=2-00:00:00",
            "cluster.env={NCCL_DEBUG: INFO}",
            "run_id=g",
        ],
    )
    (job,) = stage_jobs(["sft"], "/cfg/tiny.yaml", ["run_id=g"], cfg)
    text = render([job], {"sft": Path("/runs/tiny/sft/g")}, cfg, "/cfg/tiny.yaml")
    (section,) = scripts(text)
    opts = sbatch_options(section)
    assert {
        k: opts[k]
        for k in (
            "--nodes",
            "--gpus-per-node",
            "--cpus-per-task",
            "--partition",
            "--account",
            "--qos",
            "--mem",
            "--constraint",
            "--time",
        )
    } == {
        "--nodes": "2",
        "--gpus-per-node": "8",
        "--cpus-per-task": "64",
        "--partition": "gpu",
        "--account": "proj",
        "--qos": "high",
        "--mem": "500G",
        "--constraint": "a100",
        "--time": "2-00:00:00",
    }
    assert "--exclusive" in opts
    assert "OMP_NUM_THREADS=8 NCCL_DEBUG=INFO" in text  # 64 CPUs / 8 processes; cluster.env wins
    assert "--nproc_per_node=8 --nnodes=2" in section[-1]


def test_quoting_paths_and_extra_options_reach_sbatch_as_data(tmp_path):
    weird = tmp_path / 'we\'ird dir; $(touch INJECTED) "q"'
    cfg = load_config(
        TINY,
        [
            f"output_root={json.dumps(str(weird))}",
            "run_id=q",
            'cluster.sbatch_extra=["--reservation=my res; rm -rf x"]',
        ],
    )
    (job,) = stage_jobs(["prepare"], str(weird / "my recipe.yaml"), [], cfg)
    run_dir = weird / "tiny" / "prepare" / "q"
    text = render([job], {"prepare": run_dir}, cfg, str(weird / "my recipe.yaml"))
    (section,) = scripts(text)
    opts = sbatch_options(section)
    assert opts["--comment"] == str(run_dir) and opts["--reservation"] == "my res; rm -rf x"
    script = "\n".join(section[: next(i for i, line in enumerate(section) if line.startswith("srun "))])
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    srun = shlex.split(next(line for line in section if line.startswith("srun ")))
    assert srun[-1] == str(run_dir / "slurm") and srun[srun.index("--output") + 1] == f"{run_dir}/slurm/%j_%t_log.out"
    assert shlex.split(section[-1])[4:6] == ["--config", str(weird / "my recipe.yaml")]
    assert not list(tmp_path.rglob("INJECTED"))


def test_signal_delay_must_fit_in_the_time_limit():
    cfg = load_config(TINY, ["cluster.time=2", "cluster.signal_delay_s=120", "run_id=t"])
    (job,) = stage_jobs(["sft"], "c.yaml", [], cfg)
    with pytest.raises(ValueError, match="signal_delay_s=120 is not shorter than cluster.time=2"):
        sbatch_parameters(job, cfg, Path("/r"), None)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "/no/such/recipe.yaml"], "config file /no/such/recipe.yaml does not exist"),
        (["--container", "/no/such/image.sif"], "container image /no/such/image.sif does not exist"),
        (["sft.global_batch_size=30"], "sft.global_batch_size=30 is not divisible by sft.batch_size 16 x world size 2"),
        (["--time", "soon"], "cluster.time 'soon' is not a SLURM time"),
        (['cluster.sbatch_extra=["--array=0-3"]'], "sets --array, which medlava sets itself"),
    ],
)
def test_refused_before_the_queue_with_the_reason(tmp_path, args, needle):
    base = ["sft", "--executor", "slurm", "--nodes", "2", "--cpus-per-task", "1", "--output-root", str(tmp_path / "o")]
    if "--config" not in args:
        base += ["--config", str(TINY)]
    out = submit(*base, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and out.stderr.startswith("submit:")
    assert not (tmp_path / "o").exists(), "nothing may be written (or queued) for a refused submission"


@pytest.mark.parametrize(
    "args, key",
    [
        (['cluster.qos="normal\\ntouch INJECTED #"'], "qos"),
        (["--account", "proj\ntouch INJECTED"], "account"),
        (["--constraint", "a100\r\n#SBATCH --uid=0"], "constraint"),
        (['cluster.mem="1G\\n"'], "mem"),
        (['cluster.partition="gpu\\x1b[2J"'], "partition"),
        (["--time", "30\t"], "time"),
        (['cluster.sbatch_extra=["--reservation=r\\ntouch INJECTED"]'], "sbatch_extra"),
        (['cluster.env={NCCL_DEBUG: "INFO\\u0085"}'], "env"),
    ],
)
def test_control_characters_in_cluster_strings_are_refused_naming_the_key(tmp_path, args, key):
    """A newline in a cluster value would end its `#SBATCH` line and put a shell line into the job script."""
    out = submit(
        "sft",
        "--config",
        str(TINY),
        "--executor",
        "slurm",
        "--dry-run",
        "--cpus-per-task",
        "1",
        "--output-root",
        str(tmp_path / "o"),
        "run_id=n",
        *args,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stdout
    assert f"cluster.{key} value " in out.stderr and "holds a control character" in out.stderr, out.stderr
    assert "#SBATCH" not in out.stdout and not list(tmp_path.rglob("INJECTED"))


@pytest.mark.parametrize("flag", [["--nodes", "2"], ["--container", "x.sif"]])
def test_local_executor_refuses_what_needs_slurm(tmp_path, flag):
    out = submit("sft", "--config", str(TINY), "--executor", "local", *flag, cwd=tmp_path)
    assert out.returncode == 2 and "use --executor slurm" in out.stderr


def test_launches_in_the_same_second_get_different_run_ids(tmp_path, capsys):
    main = runpy.run_path(str(SUBMIT))["main"]  # in this process: 20 launches well within a second or two
    ids = []
    for _ in range(20):
        assert (
            main(["prepare", "--config", str(TINY), "--executor", "local", "--dry-run", "--output-root", str(tmp_path)])
            == 0
        )
        ids.append(re.search(r"# executor: local; run id (\S+);", capsys.readouterr().out)[1])
    assert len(set(ids)) == 20, ids


def test_is_worker_tells_workers_from_torchrun_and_apptainer():
    assert is_worker(["/v/bin/python", "-u", "-m", "medlava", "sft"])
    assert is_worker(["python3.11", "-m", "medlava", "infer"])
    assert not is_worker(["/v/bin/python", "-m", "torch.distributed.run", "--nnodes=2", "-m", "medlava", "sft"])
    assert not is_worker(["apptainer", "exec", "img.sif", "python", "-m", "medlava", "sft"])


@pytest.mark.slow
def test_node_task_stops_torchrun_workers_on_usr2_and_asks_for_a_requeue(tmp_path):
    """SLURM signals every process of the step. torchrun must survive USR2 (it is started ignoring it), the
    workers checkpoint at an agreed step and exit 75, and the task reports a stop (75: not under SLURM,
    so it asks for a re-run instead of `scontrol requeue`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["MEDLAVA_CACHE"] = str(tmp_path / "cache")
    base = [
        "--config",
        str(TINY),
        f"output_root={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'ham'}",
        "data.synthetic.n_lesions=40",
    ]
    subprocess.run([PY, "-m", "medlava", "prepare", *base, "run_id=p"], env=env, check=True, capture_output=True)
    # Build the tiny model cache first: two ranks building it at once can race (models/tiny.py).
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
    code = (
        "import sys; from medlava.cluster.jobs import Job; from medlava.cluster.node_task import NodeTask; "
        "NodeTask(Job('sft', 'sft', sys.argv[1:], procs_per_node=2))()"
    )
    args = ["sft", *base, "run_id=s", "sft.init_from=none", "sft.batch_size=4", "sft.max_steps=40", "sft.save_every=2"]
    task = subprocess.Popen([PY, "-c", code, *args], env=env, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "runs" / "tiny" / "sft" / "s" / "checkpoints"
    deadline = time.time() + 180
    while not (ckpts / "step-000002").exists() and task.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert task.poll() is None, task.communicate()[1][-3000:]
    for pid in descendants(task.pid):  # what SLURM's proctrack does with a step's signal
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:  # a short-lived helper process
            pass
    _, err = task.communicate(timeout=120)
    assert task.returncode == 75, err[-3000:]
    assert "SIGUSR2: stopping the workers (SIGUSR2 ->" in err
    assert "workers stopped (exit 1)" in err, "torchrun must report the workers' exit, not die of USR2 (-12)"
    steps = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 2 <= steps[-1] < 40 and not (ckpts.parent / "COMPLETE.json").exists()
    assert f"checkpoint saved at step {steps[-1]} of 40" in err, err


def test_prepare_check_through_the_launcher(tmp_path):
    from medlava.data.synthetic import make_synthetic_ham10000

    root = make_synthetic_ham10000(tmp_path / "ham", n_lesions=14, max_images_per_lesion=1)
    next(root.glob("HAM10000_images_part_*/*.jpg")).unlink()
    common = [
        "--config",
        str(TINY),
        "data.synthetic=null",
        f"data.root={root}",
        "--output-root",
        str(tmp_path / "o"),
        "run_id=c",
    ]
    dry = submit(
        "prepare", "--check", "--executor", "slurm", "--dry-run", "--cpus-per-task", "1", *common, cwd=tmp_path
    )
    assert dry.returncode == 0, dry.stderr
    (job,) = scripts(dry.stdout)
    assert any(" -m medlava prepare " in line and line.endswith(" --check") for line in job), job
    out = submit("prepare", "--check", "--executor", "local", *common, cwd=tmp_path)
    run = tmp_path / "o" / "tiny" / "prepare" / "c"
    report = json.loads((run / "prepare_report.json").read_text())
    assert out.returncode == 1 and report["error_counts"] == {"missing_image": 1}
    assert not (run / "train.jsonl").exists()


def test_stage_check_is_doctor_in_a_short_one_node_job_with_the_stages_gpus(tmp_path):
    common = ["--config", str(TINY), "--output-root", str(tmp_path / "o"), "run_id=d"]
    dry = submit(
        "sft",
        "--check",
        "--executor",
        "slurm",
        "--dry-run",
        "--nodes",
        "2",
        "--gpus",
        "0",
        "--cpus-per-task",
        "1",
        "--time",
        "24:00:00",
        *common,
        cwd=tmp_path,
    )
    assert dry.returncode == 0, dry.stderr
    (job,) = scripts(dry.stdout)  # one job, whatever the stage's node count
    options = sbatch_options(job)
    assert options["--nodes"] == "1" and options["--time"] == "00:15:00" and options["--job-name"] == "tiny.doctor"
    assert any(line.endswith(f"-m medlava doctor --output-root {tmp_path / 'o'} --gpus 0") for line in job), job
    # locally the same command prints doctor's screen; a GPU count this machine lacks fails it
    ok = submit("sft", "--check", "--executor", "local", *common, cwd=tmp_path)
    assert ok.returncode == 0 and "OK    python" in ok.stdout and ok.stdout.rstrip().endswith(" 0 FAIL")
    failed = submit("sft", "--check", "--executor", "local", "--gpus", "1", *common[:-1], "run_id=d2", cwd=tmp_path)
    assert failed.returncode == 1 and "the job asked for 1 per node" in failed.stdout
    refused = submit("pipeline", "--check", "--executor", "local", *common, cwd=tmp_path)
    assert refused.returncode == 2 and "--check checks one stage" in refused.stderr


def test_upstream_runs_are_resolved_when_submitting_not_on_the_nodes(tmp_path):
    """An sft with nothing prepared (nor aligned, for sft.init_from=latest) would queue, wait, and die on the
    nodes: refused here, with the lines that say what to run first; a dry run shows them as warnings. A
    pipeline's own upstream jobs count."""
    prepare, align = (tmp_path / "o" / "tiny" / s for s in ("prepare", "align"))
    lines = [
        f"data.samples=latest: no complete `prepare` run under {prepare}: run `python launch/submit.py prepare "
        "--config ...` first, or give a path",
        f"sft.init_from=latest: no complete `align` run under {align}: run `python launch/submit.py align "
        "--config ...` first, or give a path",
    ]
    common = ["--config", str(TINY), "--executor", "local", "--output-root", str(tmp_path / "o"), "run_id=u"]
    out = submit("sft", *common, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr == "".join(f"submit: refused: {line}\n" for line in lines)
    assert not (tmp_path / "o").exists()
    slurm = ["--executor", "slurm", "--dry-run", "--nodes", "2", "--gpus", "0", "--cpus-per-task", "1"]
    dry = submit("sft", *common, *slurm, cwd=tmp_path)
    assert dry.returncode == 0 and "#SBATCH --nodes=2" in dry.stdout
    assert all(f"submit: warning (submitting would refuse this): {line}\n" in dry.stderr for line in lines)
    assert not (tmp_path / "o").exists()
    out = submit("sft", *common, "sft.init_from=none", cwd=tmp_path)
    assert out.returncode == 2 and lines[0] in out.stderr and "sft.init_from" not in out.stderr
    pipeline = submit("pipeline", *common, *slurm, cwd=tmp_path)  # prepare and align are its own jobs
    assert pipeline.returncode == 0 and "data.samples" not in pipeline.stderr and "init_from" not in pipeline.stderr
    complete_runs(tmp_path / "o", "prepare")
    out = submit("sft", *common, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr == f"submit: refused: {lines[1]}\n"
    dry = submit("sft", *common, *slurm, "sft.init_from=none", cwd=tmp_path)
    assert dry.returncode == 0 and "would refuse" not in dry.stderr, dry.stderr
    out = submit("infer", *common, "infer.checkpoint=base", "data.samples=/nowhere/prepared", cwd=tmp_path)
    assert out.returncode == 2 and "data.samples=/nowhere/prepared: /nowhere/prepared does not exist" in out.stderr


def test_a_node_log_keeps_the_first_error_and_cuts_the_lost_rendezvous_noise():
    """The stderr of a node's torchrun in a job whose ranks failed (tests/data): 84 lines, of which one says what
    went wrong. The node task's filter keeps it (and torch's one line that it stopped the workers), cuts the rest,
    and has it for the end of the log."""
    lines = (ROOT / "tests" / "data" / "torchrun-peer-failed.log").read_text().splitlines()
    error = "medlava sft: /shared/runs/not-prepared holds no dataset.json: is it a `prepare` run directory?"
    f = LogFilter()
    kept = [k for line in lines for k in f.feed(line)] + f.flush()
    assert kept == [error, next(line for line in lines if "Sending process" in line)]
    assert f.cut == len(lines) - 2 and f.summary() == error
    # without the rank's own line, the rendezvous error is what is known, said as such
    f = LogFilter()
    assert [k for line in lines if line != error for k in f.feed(line)] + f.flush() == kept[1:]
    assert f.summary() == (
        "the rendezvous with the other nodes failed (torch.distributed.elastic.rendezvous.api."
        "RendezvousConnectionError: The connection to the C10d store has failed. See inner exception "
        "for details.); if another node's log ends with an error, that one came first"
    )
    # a worker's own traceback passes whole, and its exception is the error
    worker = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "    f()",
        "ValueError: the batch is empty",
        "",
        "a log line after it",
    ]
    f = LogFilter()
    assert [k for line in worker for k in f.feed(line)] + f.flush() == worker
    assert f.summary() == "ValueError: the batch is empty"


def test_memory_per_gpu_scales_with_each_jobs_gpus_and_cpu_jobs_ask_for_mem(monkeypatch):
    from medlava.cluster import slurm
    from medlava.cluster.sinfo import parse_sinfo

    cfg = load_config(
        TINY,
        [
            "cluster.gpus_per_node=8",
            "cluster.mem_per_gpu=80G",
            "cluster.mem=32G",
            "cluster.partition=gpu",
            "infer.chunks=2",
            "run_id=m",
        ],
    )
    jobs = {j.name: j for j in stage_jobs(["prepare", "sft", "infer"], "c.yaml", [], cfg)}
    params = {n: sbatch_parameters(j, cfg, Path("/r"), None) for n, j in jobs.items()}
    assert params["sft"]["mem_per_gpu"] == "80G" and "mem" not in params["sft"]  # SLURM takes one of the two
    assert params["infer-chunks"]["mem_per_gpu"] == "80G"  # one GPU, one share
    assert params["prepare"]["mem"] == "32G" and "mem_per_gpu" not in params["prepare"]
    assert params["sft"]["additional_parameters"]["time"] == "04:00:00"  # as SLURM writes limits
    monkeypatch.setattr(slurm, "partitions", lambda: parse_sinfo("gpu*|up|2|64|512000|gpu:a100:8\n"))
    problems = slurm.resource_problems(list(jobs.values()), cfg)
    assert problems == ["cluster.mem_per_gpu=80G x 8 GPUs: nodes of partition gpu have at most 512000 MB"]
    cfg.cluster.mem_per_gpu = "60G"
    assert slurm.resource_problems(list(jobs.values()), cfg) == []
