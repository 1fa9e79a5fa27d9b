"""The local executor: runs a launch's jobs on this machine as subprocesses, in dependency order, with
job-array tasks side by side; each task's output goes to the console (or, for array tasks, to its log
only) and to `<run dir>/logs/`."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medlava.cluster.jobs import Job
from medlava.io import atomic_write_json


class JobFailed(RuntimeError):
    pass


def _run_task(job: Job, idx: int | None, log_dir: Path, echo: bool, env: dict[str, str]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (f"{job.name}.log" if idx is None else f"{job.name}_{idx}.log")
    with log_path.open("ab") as log, subprocess.Popen(job.argv(idx), stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
    if proc.returncode != 0:
        raise JobFailed(f"{job.name}{'' if idx is None else f' task {idx}'} exited with {proc.returncode}; "
                        f"see {log_path}")


def run_local(jobs: list[Job], run_dirs: dict[str, Path], parallelism: int, env_extra: dict[str, str]) -> None:
    env = {**os.environ, **env_extra}
    for job in jobs:
        log_dir = run_dirs[job.name] / "logs"
        atomic_write_json(log_dir / f"{job.name}.launch.json",
                          {"executor": "local", "commands": [job.shell(i) for i in
                                                             (range(job.array) if job.array else [None])]})
        first = job.shell() if job.array is None else f"{job.shell(0)} (task 0 of {job.array})"
        print(f"==> {job.name}: {first}", flush=True)
        if job.array is None:
            _run_task(job, None, log_dir, echo=True, env=env)
            continue
        with ThreadPoolExecutor(max_workers=min(parallelism, job.array)) as pool:
            futures = [pool.submit(_run_task, job, i, log_dir, False, env) for i in range(job.array)]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise JobFailed("; ".join(str(e) for e in errors))
        print(f"    {job.array} tasks done; logs in {log_dir}", flush=True)
