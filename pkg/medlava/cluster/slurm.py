"""The slurm executor: a launch's jobs as sbatch jobs through submitit, chained with afterok.

Each job is one submitit SlurmExecutor submission with one task per node (ntasks_per_node=1); the
pickled callable is a NodeTask (node_task.py), which starts torchrun (or python) for its node. A job array
(infer chunks) is one `submit_array` of NodeTasks. submitit writes the sbatch script, the pickles and the
per-task logs into `<run dir>/slurm/`; we add `submissions.json` there (ids, script, command lines), which
`launch/submit.py status|logs|cancel` read.

What cannot run is refused before anything reaches the queue (resource_problems, sbatch_parameters); a dry run
renders the jobs as configured and shows what sinfo says does not fit as warnings."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from medlava.cluster.container import Apptainer, apptainer_for
from medlava.cluster.jobs import Job, Rendezvous
from medlava.cluster.node_task import NodeTask, default_env
from medlava.cluster.sinfo import choose_partition, partitions
from medlava.config import Config
from medlava.io import atomic_write_json, read_json_list

RECORD = "submissions.json"
# The values a node task reads from SLURM at run time, as a dry run shows them.
PLACEHOLDERS = Rendezvous(node_rank="${SLURM_NODEID}", host="${HEAD}", port="${PORT}", job_id="${SLURM_JOB_ID}")
ARRAY_INDEX = "${SLURM_ARRAY_TASK_ID}"
# sbatch options medlava sets itself: cluster.sbatch_extra may not override them.
MANAGED = {
    "job-name",
    "nodes",
    "ntasks-per-node",
    "cpus-per-task",
    "gpus-per-node",
    "time",
    "mem",
    "mem-per-gpu",
    "partition",
    "account",
    "qos",
    "constraint",
    "exclusive",
    "signal",
    "open-mode",
    "output",
    "error",
    "array",
    "dependency",
    "requeue",
    "comment",
    "kill-on-invalid-dep",
    "wckey",
}


class SubmitError(RuntimeError):
    pass


def minutes(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"cluster.time {text!r} is not a SLURM time (e.g. 30, 04:00:00, 2-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:
        d, h, mi, s = int(days), int(a), int(b or 0), int(c or 0)
    elif c is not None:
        d, h, mi, s = 0, int(a), int(b), int(c)
    else:
        d, h, mi, s = 0, 0, int(a), int(b or 0)
    total = d * 1440 + h * 60 + mi + math.ceil(s / 60)
    if total < 1:
        raise ValueError(f"cluster.time {text!r} is under a minute, SLURM's smallest limit")
    return total


def slurm_time(total_minutes: int) -> str:
    """A limit as SLURM writes it (squeue, scontrol): [D-]HH:MM:SS."""
    days, rest = divmod(total_minutes, 1440)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text


def megabytes(text: str, key: str = "cluster.mem") -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not m:
        raise ValueError(f"{key} {text!r} is not a SLURM memory size (e.g. 64G, 500M)")
    return math.ceil(int(m.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[m.group(2)])


def extra_parameters(lines: list[str]) -> dict[str, str | bool]:
    """cluster.sbatch_extra (`--key=value` or `--flag`) as submitit additional_parameters, which quotes them."""
    out: dict[str, str | bool] = {}
    for line in lines:
        text = line.strip().removeprefix("#SBATCH").strip()
        key, sep, value = text.removeprefix("--").partition("=")
        if not text.startswith("--") or not re.fullmatch(r"[a-z][a-z0-9-]*", key) or "\n" in value:
            raise ValueError(f"cluster.sbatch_extra entry {line!r} is not `--option=value` or `--flag`")
        if key in MANAGED:
            raise ValueError(
                f"cluster.sbatch_extra sets --{key}, which medlava sets itself: use the "
                f"matching cluster.* key or command-line flag instead"
            )
        out[key] = value if sep else True
    return out


def job_mem(job: Job, c) -> tuple[int, str]:
    """The memory per node `job` asks for, in MB, and where it comes from: cluster.mem_per_gpu x its GPUs when
    both are set, else cluster.mem."""
    if job.gpus_per_node and c.mem_per_gpu:
        per_gpu = megabytes(c.mem_per_gpu, "cluster.mem_per_gpu")
        return per_gpu * job.gpus_per_node, f"cluster.mem_per_gpu={c.mem_per_gpu} x {job.gpus_per_node} GPUs"
    return (megabytes(c.mem), f"cluster.mem={c.mem}") if c.mem else (0, "")


def resource_problems(jobs: list[Job], cfg: Config) -> list[str]:
    """What the partition cannot run (from sinfo): GPUs, CPUs or memory per node, node count, or the partition
    itself. Refused on submit; a dry run shows them as warnings and renders the jobs as configured."""
    c = cfg.cluster
    try:
        part = choose_partition(partitions(), c.partition)
    except ValueError as e:
        return [str(e)]
    groups, partition = part.groups, part.name
    problems: list[str] = []
    for job in jobs:
        most, (mem, asked) = max(g.gpus for g in groups), job_mem(job, c)
        if job.gpus_per_node > most:
            problems.append(
                f"--gpus {job.gpus_per_node} (cluster.gpus_per_node): partition {partition} has at most "
                f"{most} GPUs per node (sinfo GRES: {', '.join(sorted({g.gres for g in groups}))})"
            )
        elif c.cpus_per_task > max(g.cpus for g in groups):
            problems.append(
                f"cluster.cpus_per_task={c.cpus_per_task}: nodes of partition {partition} have at most "
                f"{max(g.cpus for g in groups)} CPUs; lower it (--cpus-per-task)"
            )
        elif mem > max(g.mem_mb for g in groups):
            problems.append(f"{asked}: nodes of partition {partition} have at most {max(g.mem_mb for g in groups)} MB")
        else:
            fit = sum(
                g.count for g in groups if g.gpus >= job.gpus_per_node and g.cpus >= c.cpus_per_task and g.mem_mb >= mem
            )
            if fit < job.nodes:
                problems.append(
                    f"{job.name} needs {job.nodes} nodes with {job.gpus_per_node} GPUs and "
                    f"{c.cpus_per_task} CPUs; partition {partition} has {fit} such nodes"
                )
    return list(dict.fromkeys(problems))


def check_paths(run_dirs: dict[str, Path]) -> None:
    for d in run_dirs.values():
        if "%" in str(d) or "\n" in str(d):
            raise ValueError(
                f"run directory {str(d)!r} holds '%' or a newline: SLURM reads '%' in log paths as "
                "a pattern; choose another --output-root"
            )


def sbatch_parameters(job: Job, cfg: Config, run_dir: Path, dependency: str | None) -> dict:
    """submitit SlurmExecutor parameters for `job`; submitit quotes every value into `#SBATCH` lines."""
    c = cfg.cluster
    time_min = minutes(c.time)
    if c.signal_delay_s >= time_min * 60:
        raise ValueError(
            f"cluster.signal_delay_s={c.signal_delay_s} is not shorter than cluster.time={c.time}: "
            "the warning signal would come at once"
        )
    # submitit takes whole minutes (and keeps them for its own timeout count); the script says what SLURM writes
    extra: dict[str, str | bool] = {"requeue": True, "time": slurm_time(time_min), **extra_parameters(c.sbatch_extra)}
    params: dict = {
        "job_name": f"{cfg.name}.{job.name}",
        "nodes": job.nodes,
        "ntasks_per_node": 1,
        "cpus_per_task": c.cpus_per_task,
        "time": time_min,
        "signal_delay_s": c.signal_delay_s,
        "comment": str(run_dir.absolute()),
        "wckey": None,
        # one node task failing ends the step instead of leaving the others in a collective
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    job_mem(job, c)  # a malformed size is refused here, not by sbatch
    if job.gpus_per_node and c.mem_per_gpu:
        params["mem_per_gpu"] = c.mem_per_gpu
    elif c.mem:
        params["mem"] = c.mem
    if c.exclusive:
        params["exclusive"] = True
    if job.gpus_per_node:
        params["gpus_per_node"] = job.gpus_per_node
    if job.array:
        params["array_parallelism"] = c.array_parallelism
    if dependency:
        params["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"  # a failed dependency cancels this job instead of PENDING forever
    params["additional_parameters"] = extra
    return params


def node_task(job: Job, idx: int | None, cfg: Config, container: Apptainer | None) -> NodeTask:
    return NodeTask(
        job,
        idx,
        sys.executable,
        dict(cfg.cluster.env),
        default_env(cfg.cluster.cpus_per_task, job.procs_per_node),
        container,
    )


def sbatch_script(job: Job, params: dict, folder: Path) -> str:
    """The script submitit writes for these parameters, from submitit's own generator (the function
    SlurmExecutor calls; private, so the pinned submitit version matters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=job.array, **params)


def display_join(argv: list[str]) -> str:
    """shlex.join, except that ${NAME} placeholders stay expandable ("${NAME}")."""
    words = []
    for arg in argv:
        parts = re.split(r"(\$\{[A-Z_]+\})", arg)
        words.append(
            "".join(f'"{p}"' if p.startswith("${") else shlex.quote(p) for p in parts if p)
            if len(parts) > 1
            else shlex.quote(arg)
        )
    return " ".join(words)


def render(jobs: list[Job], run_dirs: dict[str, Path], cfg: Config, config_path: str) -> str:
    """What a dry run prints: each job's sbatch script and the command its srun tasks run."""
    container = apptainer_for(cfg, config_path)
    out = []
    for n, job in enumerate(jobs, 1):
        folder = (run_dirs[job.name] / "slurm").absolute()
        dependency = "afterok:" + ":".join(f"<{a} job id>" for a in job.after) if job.after else None
        task = node_task(job, ARRAY_INDEX if job.array else None, cfg, container)
        out += [
            f"# ---- job {n}/{len(jobs)}: {job.name}"
            + (f" (array of {job.array}: task i does chunk i)" if job.array else "")
            + f"; submitit writes this script to {folder}/%j_submission.sh",
            sbatch_script(job, sbatch_parameters(job, cfg, run_dirs[job.name], dependency), folder).rstrip(),
        ]
        where = f"each of the {job.nodes} srun tasks (one per node) runs" if job.nodes > 1 else "the srun task runs"
        env = " ".join(f"{k}={v}" for k, v in {**task.env_defaults, **task.env}.items())
        out.append(f"# {where} (environment: {env} over the job's own, cluster.env winning):")
        if job.nodes > 1:
            out.append(
                '#   HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1); '
                "PORT=$((20000 + SLURM_JOB_ID % 40000))"
            )
        out.append(display_join(task.argv(PLACEHOLDERS if job.nodes > 1 else None)))
    return "\n".join(out)


def record(run_dir: Path, entry: dict) -> None:
    path = run_dir / "slurm" / RECORD
    atomic_write_json(path, [*read_json_list(path), entry])


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True)


def submit_slurm(
    jobs: list[Job], run_dirs: dict[str, Path], cfg: Config, config_path: str, command: str
) -> dict[str, str]:
    """Submit `jobs` in order, each after (afterok) the ones it depends on; return {job name: job id}.
    Does not wait. If a submission fails, the jobs already submitted are cancelled."""
    import submitit

    container = apptainer_for(cfg, config_path)
    for path in container.binds if container else ():
        Path(path).mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    try:
        with submitit.helpers.clean_env():  # a launch from inside a job must not inherit its SLURM_* values
            for job in jobs:
                run_dir = run_dirs[job.name]
                folder = run_dir / "slurm"
                dependency = "afterok:" + ":".join(ids[a] for a in job.after) if job.after else None
                params = sbatch_parameters(job, cfg, run_dir, dependency)
                executor = submitit.SlurmExecutor(folder=folder)
                executor.update_parameters(**params)
                if job.array:
                    subs = executor.submit_array([node_task(job, i, cfg, container) for i in range(job.array)])
                    job_id = subs[0].job_id.split("_")[0]
                else:
                    job_id = executor.submit(node_task(job, None, cfg, container)).job_id
                ids[job.name] = job_id
                task = node_task(job, ARRAY_INDEX if job.array else None, cfg, container)
                record(
                    run_dir,
                    {
                        "name": job.name,
                        "job_id": job_id,
                        "array": job.array,
                        "nodes": job.nodes,
                        "after": {a: ids[a] for a in job.after},
                        "submitted": time.strftime("%FT%T%z"),
                        "sbatch_script": str(folder.absolute() / f"{job_id}_submission.sh"),
                        "submit_command": command,
                        "task_command": display_join(task.argv(PLACEHOLDERS if job.nodes > 1 else None)),
                        "cwd": os.getcwd(),
                    },
                )
    except Exception as e:
        cancel(list(ids.values()))
        done = f"; cancelled the jobs already submitted ({', '.join(ids.values())})" if ids else ""
        raise SubmitError(f"submitting {job.name} failed: {e}{done}") from e
    return ids
