"""`medlava submit` (and its shim `launch/submit.py`): parse, validate, hand the jobs to an executor (local, or SLURM
through submitit).

    python launch/submit.py sft --config jobs/configs/tiny.yaml --gpus 2 sft.lr=2e-4
    python launch/submit.py sft --config ... --executor slurm --nodes 2 --gpus 8 --partition gpu --time 24:00:00
    python launch/submit.py infer --config ... --chunks 16 --dry-run     # print config, sbatch scripts, commands
    python launch/submit.py eval --config jobs/configs/mimic_cxr_report_sft.yaml --gpus 1 --chunks 8
        # the report metrics (RadEval) as 8 one-GPU array tasks and a merge, weights staged beforehand
    python launch/submit.py pipeline --config ...    # [prepare ->] align -> sft -> infer array -> eval, afterok
    python launch/submit.py prepare --config ... --check   # list every problem in the data; write no samples
    python launch/submit.py sft --config ... --check --executor slurm --partition gpu --gpus 8
        # `medlava doctor` in a short one-node job with the stage's partition, GPUs and container; prints its screen
    python launch/submit.py demo --config jobs/configs/tiny.yaml --executor local   # the chain on this machine
    python launch/submit.py status [RUN]     # RUN: a run id (all its stages) or a run directory
    python launch/submit.py logs RUN [--job NAME] [--task N]
    python launch/submit.py cancel RUN

On SLURM nothing blocks: the job ids are printed and the command returns.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from medlava.cluster.jobs import Job, stage_jobs
from medlava.cluster.local import JobFailed, run_local
from medlava.config import Config, ConfigError, dump_config, load_config
from medlava.runs import check_reuse, latest_complete, new_run_id, resolve, stage_root
from medlava.stages import CHAIN, STAGES

MONITOR = ("status", "logs", "cancel")
# Command-line flags that set cluster.* keys.
CLUSTER_FLAGS = {
    "nodes": int,
    "gpus": int,
    "partition": str,
    "account": str,
    "qos": str,
    "time": str,
    "mem": str,
    "cpus_per_task": int,
    "constraint": str,
    "container": str,
    "array_parallelism": int,
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*STAGES, "demo", "pipeline"])
    p.add_argument("--config", required=True, help="YAML recipe, e.g. jobs/configs/tiny.yaml")
    p.add_argument(
        "--executor",
        choices=["local", "slurm"],
        help="default: cluster.executor, else slurm when sbatch is on PATH, else local",
    )
    p.add_argument("--nodes", type=int, help="cluster.nodes (training stages)")
    p.add_argument("--gpus", type=int, help="GPUs (processes) per node: cluster.gpus_per_node; 0 = CPU")
    p.add_argument("--partition", help="cluster.partition (default: the cluster's default partition)")
    p.add_argument("--account", help="cluster.account")
    p.add_argument("--qos", help="cluster.qos")
    p.add_argument("--time", help="cluster.time, a SLURM time limit (e.g. 04:00:00)")
    p.add_argument("--mem", help="cluster.mem per node (e.g. 256G)")
    p.add_argument("--cpus-per-task", type=int, help="cluster.cpus_per_task (one task per node)")
    p.add_argument("--constraint", help="cluster.constraint (node features, e.g. a100)")
    p.add_argument("--exclusive", action="store_true", help="cluster.exclusive: whole nodes")
    p.add_argument("--container", help="cluster.container: an Apptainer image (.sif) to run the jobs in")
    p.add_argument("--array-parallelism", type=int, help="cluster.array_parallelism: array tasks at once")
    p.add_argument("--output-root", help="where run directories go (a shared file system on clusters)")
    p.add_argument(
        "--chunks",
        type=int,
        help="infer, eval: split the answers (the report metrics) into this many job-array tasks and a merge",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check instead of running: prepare reports every problem in the data in one pass "
        "(prepare_report.json, no samples written); any other stage runs `medlava doctor` in a "
        "one-node job on the stage's partition, GPUs and container, waits, and prints its screen. "
        "Exit 1 when a check fails",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, sbatch scripts and command lines; submit nothing",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. sft.lr=2e-4")
    return p.parse_intermixed_args(argv)


def yaml_str(value: str) -> str:
    """`value` as an override's YAML that reads back as this string (`10`, `null` or `a #b` would not)."""
    try:
        if yaml.safe_load(value) == value:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)  # a JSON string is a YAML string


def cli_overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    for flag, kind in CLUSTER_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            key = "gpus_per_node" if flag == "gpus" else flag
            out.append(f"cluster.{key}={value if kind is int else yaml_str(value)}")
    if args.exclusive:
        out.append("cluster.exclusive=true")
    if args.output_root is not None:
        out.append(f"output_root={yaml_str(args.output_root)}")
    if args.chunks is not None:  # the array of the stage given (infer's for a pipeline)
        stage = STAGES[args.stage if args.stage in STAGES and STAGES[args.stage].array else "infer"]
        out.append(f"{stage.key(stage.array)}={args.chunks}")
    return out


def stages_of(stage: str, cfg: Config) -> tuple[str, ...]:
    if stage == "demo":
        return CHAIN
    if stage != "pipeline":
        return (stage,)
    try:  # prepare only when there is nothing prepared to train on
        if cfg.data.samples != "latest" or latest_complete(cfg, "prepare"):
            return CHAIN[1:]
    except FileNotFoundError:
        pass
    return CHAIN


def pinned(stage: str, stages: tuple[str, ...], cfg: Config) -> str:
    """`latest` in `stage`'s pinned key (stages.Stage.pins), resolved once, here, for every job: each array task
    resolving it itself would read a newer upstream run that completes while the array runs. As `latest` prefers
    the upstream run of the same run id, so does this: this launch's own, or one started with that id and not
    finished yet."""
    up = STAGES[stage].upstream
    own = stage_root(cfg, up) / cfg.run_id
    if up in stages or (own / "run.json").exists():
        return str(own.absolute())
    return str(latest_complete(cfg, up).absolute())


def missing_inputs(stages: tuple[str, ...], cfg: Config) -> list[str]:
    """The upstream runs these stages would read that do not exist now (those this launch makes excepted): found
    here, not on the nodes after the queue wait."""
    problems = []
    for s in stages:
        for i in STAGES[s].inputs:
            if i.stage in stages or not i.read(cfg):
                continue
            try:
                resolve(cfg, i.value(cfg), i.stage)
            except FileNotFoundError as e:
                problems.append(f"{i.key}={i.value(cfg)}: {e}")
    return list(dict.fromkeys(problems))


def run_problems(
    jobs: list[Job], run_dirs: dict[str, Path], stages: tuple[str, ...], cfg: Config, check: bool
) -> list[str]:
    """What the jobs would refuse when they start, found before anything is written or queued: a run directory they
    may not continue (runs.check_reuse), an upstream run that does not exist (missing_inputs)."""
    problems = []
    for j in jobs:
        if j.stage in STAGES:
            try:
                check_reuse(run_dirs[j.name], j.stage, *STAGES[j.stage].reuse(cfg))
            except ConfigError as e:
                problems.append(str(e))
    return problems + ([] if check else missing_inputs(stages, cfg))


def warn_or_refuse(problems: list[str], dry_run: bool) -> bool:
    """A dry run previews the jobs anywhere: what submitting would refuse is printed as warnings. Otherwise the
    problems are refused; True when the launch must stop."""
    for problem in problems:
        print(
            f"submit: {'warning (submitting would refuse this)' if dry_run else 'refused'}: {problem}", file=sys.stderr
        )
    return bool(problems) and not dry_run


def doctor_job(job: Job, cfg: Config) -> tuple[list[Job], Config]:
    """`medlava doctor` on one node of what `job` would get (partition, GPUs, container), with a short time
    limit: what the stage's environment can run, seen from where it will run."""
    args = [
        "doctor",
        "--output-root",
        cfg.output_root,
        "--gpus",
        str(job.gpus_per_node),
        *STAGES[job.stage].doctor_args(cfg),
    ]
    doctor = Job("doctor", "doctor", args, gpus_per_node=job.gpus_per_node)
    short = cfg.cluster.model_copy(update={"time": "15", "signal_delay_s": min(cfg.cluster.signal_delay_s, 60)})
    return [doctor], cfg.model_copy(update={"cluster": short})


def launch(argv: list[str]) -> int:
    args = parse(argv)
    overrides = cli_overrides(args)
    if args.check and args.stage in ("demo", "pipeline"):
        print(
            f"submit: --check checks one stage; give the stage (prepare for the data, a training stage for the "
            f"nodes), not {args.stage}",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    fresh_id = cfg.run_id is None
    if fresh_id:  # every job of this launch writes under one run id
        cfg.run_id = new_run_id()
        overrides.append(f"run_id={cfg.run_id}")
    executor = args.executor or (
        cfg.cluster.executor if cfg.cluster.executor != "auto" else "slurm" if shutil.which("sbatch") else "local"
    )
    if executor == "local" and cfg.cluster.nodes > 1:
        print(
            f"submit: refused: cluster.nodes={cfg.cluster.nodes} needs a scheduler to place one torchrun per "
            "node: use --executor slurm (or --nodes 1)",
            file=sys.stderr,
        )
        return 2
    if executor == "local" and cfg.cluster.container:
        print(
            "submit: refused: cluster.container is set, but the local executor runs on this machine without "
            "Apptainer: use --executor slurm, or drop --container",
            file=sys.stderr,
        )
        return 2
    # Jobs may start in another directory or after the recipe was moved: they get its absolute path.
    config_path = str(Path(args.config).absolute()) if executor == "slurm" else args.config
    stages = stages_of(args.stage, cfg)
    for s in stages if not args.check else ():
        stage = STAGES[s]
        if stage.pins and getattr(stage.settings(cfg), stage.pins) == "latest":
            key = stage.key(stage.pins)
            try:
                setattr(stage.settings(cfg), stage.pins, pinned(s, stages, cfg))
            except FileNotFoundError:  # missing_inputs names it: refused on submit, a warning in a dry run
                continue
            overrides.append(f"{key}={yaml_str(getattr(stage.settings(cfg), stage.pins))}")
    problems = [p for s in stages if not args.check for p in STAGES[s].problems(cfg)]
    if problems:  # refused here, before anything is queued
        print("submit: refused: " + "\n".join(problems), file=sys.stderr)
        return 2
    jobs = stage_jobs(stages, config_path, overrides, cfg)
    if args.check and STAGES[args.stage].check == "stage":
        jobs = [replace(j, args=[*j.args, "--check"]) for j in jobs]
    elif args.check:
        jobs, cfg = doctor_job(jobs[0], cfg)
    try:
        for j in jobs:
            if j.stage in STAGES and STAGES[j.stage].vlm:  # a --check job runs `doctor`
                cfg.vlm(j.stage)
    except ConfigError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    run_dirs = {j.name: stage_root(cfg, j.stage) / cfg.run_id for j in jobs}
    if executor == "slurm":
        return launch_slurm(args, jobs, run_dirs, cfg, config_path, stages)
    problems = run_problems(jobs, run_dirs, stages, cfg, args.check)
    if warn_or_refuse(problems, args.dry_run):
        return 2
    if args.dry_run:
        print("# resolved config\n" + dump_config(cfg))
        print(
            f"# executor: local; run id {cfg.run_id}; commands in order"
            + (f"; {len(problems)} warning(s) (stderr)" if problems else "")
            + ":"
        )
        for j in jobs:
            array = f"  # array of {j.array}: task i adds --chunk-idx i" if j.array else ""
            print(j.shell(0 if j.array else None) + array)
        return 0
    print(run_id_line(cfg, joinable=fresh_id and len(stages) == 1), flush=True)
    try:
        run_local(jobs, run_dirs, parallelism=cfg.cluster.array_parallelism, env_extra=cfg.cluster.env)
    except JobFailed as e:
        print(f"submit: {e}", file=sys.stderr)
        return 1
    if args.check:  # the screen or the data report was the output
        return 0
    print("\nOutputs:")
    for stage, path in dict((j.stage, run_dirs[j.name]) for j in jobs).items():
        print(f"  {stage:8s} {path}")
    last = run_dirs[jobs[-1].name]
    if (last / "metrics.json").exists():
        m = json.loads((last / "metrics.json").read_text())
        shown = {
            k: v
            for k, v in m.items()
            if k
            in (
                "accuracy",
                "balanced_accuracy",
                "macro_f1",
                "macro_auc",
                "bleu_4",
                "rouge_l",
                "closed_accuracy",
                "open_recall",
            )
        }
        print(
            "\nmetrics.json: "
            + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        )
    from medlava.cluster.monitor import tensorboard_hint

    if hint := tensorboard_hint(list(run_dirs.values())):
        print(hint)
    return 0


def run_id_line(cfg: Config, joinable: bool) -> str:
    """The run id, once, with how to follow it (and, for one stage under a new id, how the next joins it)."""
    root = shlex.quote(cfg.output_root)
    join = f"; the next stage joins it with run_id={cfg.run_id}" if joinable else ""
    return f"run id {cfg.run_id} (python launch/submit.py status {cfg.run_id} --output-root {root}{join})"


def launch_slurm(
    args: argparse.Namespace, jobs, run_dirs, cfg: Config, config_path: str, stages: tuple[str, ...]
) -> int:
    from medlava.cluster import slurm
    from medlava.cluster.container import apptainer_for

    try:  # every refusal happens here, before the first job reaches the queue
        slurm.check_paths(run_dirs)
        for job in jobs:
            slurm.sbatch_parameters(job, cfg, run_dirs[job.name], None)
        apptainer_for(cfg, config_path)
        # the jobs as the recipe configures them, for the cluster it is meant for: a dry run warns, submit refuses
        problems = (
            slurm.resource_problems(jobs, cfg)
            if shutil.which("sinfo")
            else ["sinfo/sbatch are not on PATH: the slurm executor needs a SLURM client (or use --executor local)"]
        )
        problems += run_problems(jobs, run_dirs, stages, cfg, args.check)
        if args.dry_run:
            warn_or_refuse(problems, dry_run=True)
            print("# resolved config\n" + dump_config(cfg))
            print(
                f"# executor: slurm; run id {cfg.run_id}; {len(jobs)} job(s), submitted in this order"
                + (f"; {len(problems)} warning(s) (stderr)" if problems else "")
            )
            print(slurm.render(jobs, run_dirs, cfg, config_path))
            return 0
        if problems:
            raise ValueError("; ".join(problems))
        command = shlex.join([sys.executable, *sys.argv])
        ids = slurm.submit_slurm(jobs, run_dirs, cfg, config_path, command)
    except ValueError as e:
        print(f"submit: refused: {e}", file=sys.stderr)
        return 2
    except slurm.SubmitError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 1
    if args.check and STAGES[args.stage].check == "doctor":
        return show_doctor(ids[jobs[0].name], run_dirs[jobs[0].name])
    print(
        f"submitted {len(jobs)} job(s), run id {cfg.run_id}"
        + (", each after the one before succeeds:" if len(jobs) > 1 else ":")
    )
    for job in jobs:
        array = f"array of {job.array}" if job.array else f"{job.nodes} node(s)"
        print(f"  {job.name:<14} {ids[job.name]:<8} {array:<12} {run_dirs[job.name]}")
    root = shlex.quote(cfg.output_root)
    print(
        f"status: python launch/submit.py status {cfg.run_id} --output-root {root}  (TensorBoard's command too, "
        "once a job has written events)\n"
        f"logs:   python launch/submit.py logs {cfg.run_id} --output-root {root} --job {jobs[-1].name}"
    )
    return 0


def show_doctor(job_id: str, run_dir: Path) -> int:
    """Wait for the doctor job and print the screen it wrote; 1 if it found a failure (or did not run)."""
    from medlava.cluster import monitor as mon

    print(
        f"submitted the check as job {job_id}; waiting for it to run (Ctrl-C leaves it queued; "
        f"python launch/submit.py logs {run_dir} shows its screen later)",
        flush=True,
    )
    (state,) = mon.wait([job_id], timeout=7 * 24 * 3600, poll=5)[job_id]
    err, out = mon.log_files(run_dir, {"job_id": job_id, "array": None}, 0)
    text = out.read_text(errors="replace") if out.exists() else ""
    screen = "\n".join(line for line in text.splitlines() if not line.startswith("submitit "))  # its own log lines
    print(f"==> medlava doctor on {state.nodes} (job {job_id}, {state.state}) <==")
    print(screen or f"(no screen; the job's log is {err})")
    return 0 if state.state == "COMPLETED" else 1


def monitor(argv: list[str]) -> int:
    from medlava.cluster import monitor as mon

    p = argparse.ArgumentParser(prog="submit.py " + argv[0])
    p.add_argument("command", choices=MONITOR)
    p.add_argument(
        "run",
        nargs=None if argv[0] != "status" else "?",
        help="a run id (every stage that shares it) or a run directory; status without it: the newest",
    )
    p.add_argument("--output-root", default="runs", help="where to look a run id up (default: runs)")
    if argv[0] == "logs":
        p.add_argument("--job", help="which job of the run (e.g. sft, infer-chunks); default: the last one")
        p.add_argument("--task", type=int, default=0, help="array task index, or node (srun task) number")
    args = p.parse_args(argv)
    run_dirs = mon.records(args.run, args.output_root)
    if not run_dirs:
        where = args.run if args.run and Path(args.run).is_dir() else f"{args.output_root}/*/*/{args.run or '*'}"
        print(
            f"submit {args.command}: no launched jobs recorded under {where} (neither slurm/{mon.RECORD} nor "
            f"logs/{mon.local.RECORD}); a run started with `medlava STAGE` directly has only its run directory",
            file=sys.stderr,
        )
        return 1
    if args.command == "status":
        print("\n".join(mon.status_lines(run_dirs)))
        return 0
    jobs = [j for d in run_dirs for j in mon.launched(d)]
    if args.command == "cancel":
        return cancel_jobs(jobs)
    chosen = [j for j in jobs if args.job in (None, j.name)]
    if not chosen:
        print(
            f"submit logs: no job {args.job!r} in this run; jobs: {', '.join(dict.fromkeys(j.name for j in jobs))}",
            file=sys.stderr,
        )
        return 1
    files = mon.job_logs(chosen[-1], args.task)
    if not files:
        print(
            f"submit logs: {chosen[-1].name} task {args.task} has no log yet in {chosen[-1].run_dir}", file=sys.stderr
        )
        return 1
    for f in files:
        print(f"==> {f} <==")
        sys.stdout.write(f.read_text(errors="replace"))
    return 0


def cancel_jobs(jobs) -> int:
    from medlava.cluster import monitor as mon
    from medlava.cluster.slurm import cancel

    live = [
        j.entry["job_id"]
        for j in jobs
        if j.executor == "slurm" and (states := mon.job_states(j.entry["job_id"])) and not all(s.done for s in states)
    ]
    cancel(live)
    print(f"cancelled {', '.join(live)}" if live else "nothing to cancel on SLURM: every job has ended")
    running = [
        f"{j.name} pid {t['pid']}"
        for j in jobs
        if j.executor == "local"
        for t in j.entry["tasks"]
        if mon.task_state(j.entry, t) == "RUNNING"
    ]
    if running:
        print(f"local jobs still running ({', '.join(running)}): stop them with Ctrl-C where they run, or kill PID")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return monitor(argv) if argv and argv[0] in MONITOR else launch(argv)
