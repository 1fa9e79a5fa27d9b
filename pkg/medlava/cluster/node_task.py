"""What each SLURM task of a medlava job runs, one task per node: the worker command (under torchrun when
the job has more than one process, inside Apptainer when it has an image) and the preemption path.

Preemption. SLURM's warning signal (`--signal=USR2@N`, `scancel --signal=USR2`) reaches every process of
the step, torchrun included. torchrun does not forward USR2 and dies of it (its default action; listing it in
TORCHELASTIC_SIGNALS_TO_HANDLE only makes torchrun terminate the workers), so the command starts with USR2
ignored — torchrun keeps ignoring it, and so do the workers until the training loop installs its handler —
and this task does the forwarding: a worker that handles USR2 gets it (the training loop saves a checkpoint
at a step all ranks agree on and exits 75), a worker that does not (infer, prepare, eval: their outputs
resume by design) gets SIGTERM. When the command has exited, the task on node 0 runs
`scontrol requeue $SLURM_JOB_ID`; the job runs this same task again, and training resumes from its
checkpoint (same run_id, resume=auto), an infer chunk from its partial answers. submitit's own
checkpoint-and-requeue handler is replaced because it would requeue at once, before the workers have saved.

`python -m medlava.cluster.node_task -- STAGE --config ...` runs the same thing from a plain sbatch script
(jobs/sbatch/)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from medlava.cluster.container import PYTHON as CONTAINER_PYTHON
from medlava.cluster.container import Apptainer
from medlava.cluster.jobs import Job, Rendezvous
from medlava.cluster.logfilter import LogFilter
from medlava.signals import EXIT_REQUEUE


def port_for(job_id: str) -> int:
    """The rendezvous port: the same on every node of a job, different for jobs that share a head node."""
    return 20000 + int(job_id) % 40000


def default_env(cpus_per_task: int, procs_per_node: int) -> dict[str, str]:
    """Defaults under the job's own environment and cluster.env (both override them)."""
    return {
        "OMP_NUM_THREADS": str(max(1, cpus_per_task // procs_per_node)),
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a rank that dies aborts the collective instead of a hang
        "PYTHONUNBUFFERED": "1",
    }


def rendezvous_from_env(env: Mapping[str, str]) -> Rendezvous:
    """Head node = first host of the allocation, as `scontrol show hostnames` expands SLURM_JOB_NODELIST."""
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()
    job_id = env["SLURM_JOB_ID"]
    return Rendezvous(node_rank=env["SLURM_NODEID"], host=hosts[0], port=str(port_for(job_id)), job_id=job_id)


# --- the processes under this task (Linux /proc) ------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"; comm may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _argv_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def is_worker(argv: list[str]) -> bool:
    """A medlava stage process: `python ... -m medlava ...` (torchrun's own line is `-m torch.distributed.run`)."""
    if not argv or not Path(argv[0]).name.startswith("python") or "-m" not in argv:
        return False
    i = argv.index("-m")
    return i + 1 < len(argv) and argv[i + 1] == "medlava"


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether `pid` has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def stop_workers(root: int) -> list[str]:
    """USR2 to every worker under `root` that handles it, SIGTERM to those that do not; SIGTERM to `root`
    when no worker is visible (e.g. in a container with its own PID namespace). Returns what was sent."""
    sent = []
    for pid in descendants(root):
        if is_worker(_argv_of(pid)):
            sig = signal.SIGUSR2 if catches(pid, signal.SIGUSR2) else signal.SIGTERM
            try:
                os.kill(pid, sig)
                sent.append(f"{sig.name} -> {pid}")
            except ProcessLookupError:
                pass
    if not sent:
        try:
            os.kill(root, signal.SIGTERM)
        except ProcessLookupError:
            pass
        sent.append(f"SIGTERM -> {root}")
    return sent


def _ignore_usr2() -> None:  # runs in the child between fork and exec: SIG_IGN survives exec
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def pump(stream: IO[bytes], logfilter: LogFilter) -> None:
    """Copy the command's stderr to ours through `logfilter`, line by line, as it comes."""
    for raw in stream:
        for line in logfilter.feed(raw.decode(errors="replace").rstrip("\n")):
            print(line, file=sys.stderr, flush=True)
    for line in logfilter.flush():
        print(line, file=sys.stderr, flush=True)


def run_stoppable(argv: list[str], env: Mapping[str, str], log, logfilter: LogFilter | None = None) -> tuple[int, bool]:
    """Run `argv`; on SIGUSR2 to this process, stop its workers (see module doc). Its stderr passes through
    `logfilter` when given. Returns (exit code, whether a stop was requested)."""
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    requested, sent = [], []

    def on_usr2(signum, frame) -> None:
        # Forward at once, while the workers are still inside a step and so still handle USR2.
        requested.append(signum)
        if proc is not None and not sent:
            sent.extend(stop_workers(proc.pid))

    previous = signal.signal(signal.SIGUSR2, on_usr2)
    try:
        proc = subprocess.Popen(
            argv, env=dict(env), preexec_fn=_ignore_usr2, stderr=subprocess.PIPE if logfilter else None
        )
        if logfilter:
            reader = threading.Thread(target=pump, args=(proc.stderr, logfilter), daemon=True)
            reader.start()
        if requested and not sent:  # the signal came while the command was being started
            sent.extend(stop_workers(proc.pid))
        logged = False
        while True:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                code = None
            if sent and not logged:
                log(f"SIGUSR2: stopping the workers ({', '.join(sent)})")
                logged = True
            if code is not None:
                if reader:  # a worker that outlived torchrun may hold the pipe open: wait only a little
                    reader.join(timeout=10)
                return code, bool(sent)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def requeue(job_id: str) -> None:
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(
            f"scontrol requeue {job_id} failed: {out.stderr.strip() or out.stdout.strip()}; "
            "the checkpoint is kept: submit again with the same run_id to resume"
        )


@dataclass(frozen=True)
class NodeTask:
    """The callable submitit pickles: one per job (per array task), run once on each node."""

    job: Job
    idx: int | None = None
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    """cluster.env: overrides the job's environment."""
    env_defaults: dict[str, str] = field(default_factory=dict)
    """default_env(): under the job's environment."""
    container: Apptainer | None = None

    def argv(self, rdzv: Rendezvous | None = None) -> list[str]:
        python = CONTAINER_PYTHON if self.container else self.python
        cmd = self.job.argv(self.idx, python, rdzv)
        return self.container.wrap(cmd) if self.container else cmd

    def __call__(self) -> None:
        env = os.environ
        node = env.get("SLURM_NODEID", "0")
        where = f"{env.get('SLURMD_NODENAME', '?')} (node {node} of {self.job.nodes})"

        def log(msg: str) -> None:
            print(f"[medlava node task {where}] {msg}", file=sys.stderr, flush=True)

        argv = self.argv(rendezvous_from_env(env) if self.job.nodes > 1 else None)
        log(f"job {env.get('SLURM_JOB_ID')} restart {env.get('SLURM_RESTART_COUNT', 0)}: {shlex.join(argv)}")
        logfilter = LogFilter()
        code, stopped = run_stoppable(argv, {**self.env_defaults, **env, **self.env}, log, logfilter)
        if logfilter.cut:
            log(
                f"cut {logfilter.cut} lines of torch.distributed errors about the lost rendezvous (what every node "
                "prints once a process of the job has failed)"
            )
        if code == 0:
            return
        if not stopped:  # the last line of the log: what failed first here
            raise RuntimeError(
                f"{self.job.name} failed on {where} (exit {code}): "
                + (logfilter.summary() or "no error was printed; see the log above")
            )
        if node != "0":
            log(f"workers stopped (exit {code}); node 0 requeues the job")
            return
        if "SLURM_JOB_ID" not in env:
            log(f"workers stopped (exit {code}); not under SLURM: run the same command again to resume")
        else:
            requeue(env["SLURM_JOB_ID"])
            log(f"workers stopped (exit {code}); requeued job {env['SLURM_JOB_ID']}")
        raise SystemExit(EXIT_REQUEUE)


def main(argv: list[str] | None = None) -> int:
    """Entry point for plain sbatch scripts: `srun python -m medlava.cluster.node_task [options] -- STAGE ...`."""
    p = argparse.ArgumentParser(prog="python -m medlava.cluster.node_task", description=main.__doc__)
    p.add_argument("--nproc-per-node", type=int, default=1, help="torchrun processes per node (GPUs; 1 on CPU)")
    p.add_argument("--container", help="Apptainer image to run the command in (bind paths with APPTAINER_BIND)")
    p.add_argument("medlava_args", nargs=argparse.REMAINDER, help="-- STAGE --config FILE [key=value ...]")
    args = p.parse_args(argv)
    rest = args.medlava_args[1:] if args.medlava_args[:1] == ["--"] else args.medlava_args
    if not rest:
        p.error("give the medlava command after --, e.g. -- sft --config jobs/configs/tiny.yaml run_id=r1")
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", 1))
    job = Job(rest[0], rest[0], rest, nodes=nodes, procs_per_node=args.nproc_per_node)
    container = Apptainer(args.container, ()) if args.container else None
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", os.cpu_count() or 1))
    NodeTask(job, container=container, env_defaults=default_env(cpus, args.nproc_per_node))()
    return 0


if __name__ == "__main__":
    sys.exit(main())
