"""Job states and logs of launched runs, local or SLURM: `launch/submit.py status|logs|cancel`, and waiting in tests.

SLURM states come from sacct when accounting works, else from `scontrol show job` (and `squeue -t all`), which
know a job only for MinJobAge after it ends; past that the run directory's COMPLETE.json tells whether the stage
finished. Local jobs' states come from the local executor's record (pids and exit codes, logs/local.json)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from medlava.cluster import local
from medlava.cluster.slurm import RECORD
from medlava.io import read_json_list
from medlava.runs import is_complete

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


@dataclass(frozen=True)
class TaskState:
    job_id: str
    """`123`, or `123_4` for array task 4 (`123_[5-7%2]` for tasks not started yet)."""
    state: str
    exit_code: str = ""
    restarts: int | None = None
    reason: str = ""
    nodes: str = ""
    start: str = ""
    end: str = ""
    source: str = ""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _sacct(job_id: str) -> list[TaskState]:
    out = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,NodeList,Start,End,Reason"])
    rows = [line.split("|") for line in (out or "").splitlines() if line.count("|") == 6]
    return [
        TaskState(jid, state.split()[0], code, None, reason, nodes, start, end, "sacct")
        for jid, state, code, nodes, start, end, reason in rows
    ]


def scontrol_fields(line: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict; values run to the next ` Key=`."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z/:_]*)=", line))
    return {
        m.group(1): line[m.end() : keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
        for i, m in enumerate(keys)
    }


def _scontrol(job_id: str) -> list[TaskState]:
    out = _run(["scontrol", "show", "job", "-o", job_id])
    states = []
    for line in (out or "").splitlines():
        f = scontrol_fields(line)
        if "JobState" not in f:
            continue
        jid = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if "ArrayTaskId" in f else f["JobId"]
        states.append(
            TaskState(
                jid,
                f["JobState"],
                f.get("ExitCode", ""),
                int(f.get("Restarts", 0)),
                f.get("Reason", ""),
                f.get("NodeList", ""),
                f.get("StartTime", ""),
                f.get("EndTime", ""),
                "scontrol",
            )
        )
    return states


def _squeue(job_id: str) -> list[TaskState]:
    out = _run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T|%r|%N"])
    return [
        TaskState(jid, state, reason=reason, nodes=nodes, source="squeue")
        for jid, state, reason, nodes in (line.split("|") for line in (out or "").splitlines() if line.count("|") == 3)
    ]


def job_states(job_id: str) -> list[TaskState]:
    """One entry per job (per array task); empty when SLURM no longer knows the job."""
    return _sacct(job_id) or _scontrol(job_id) or _squeue(job_id)


def wait(job_ids: list[str], timeout: float, poll: float = 2.0) -> dict[str, list[TaskState]]:
    """Until every task of `job_ids` has ended (a requeued job pends again, so it is waited for too)."""
    deadline = time.time() + timeout
    while True:
        states = {j: job_states(j) for j in job_ids}
        if all(s and all(t.done for t in s) for s in states.values()):
            return states
        if time.time() > deadline:
            raise TimeoutError(
                f"jobs not finished after {timeout:.0f} s: "
                + "; ".join(f"{j}: {[t.state for t in s]}" for j, s in states.items())
            )
        time.sleep(poll)


# --- runs and their records ---------------------------------------------------------------------------

RECORDS = (f"slurm/{RECORD}", f"logs/{local.RECORD}")
"""Where each executor records its jobs in a run directory."""


@dataclass(frozen=True)
class Launched:
    """One job a launch ran or submitted into a run directory, as its executor recorded it."""

    run_dir: Path
    executor: str  # local | slurm
    entry: dict

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def when(self) -> str:
        return self.entry.get("submitted") or self.entry.get("started") or ""


def launched(run_dir: Path) -> list[Launched]:
    """Every job recorded in `run_dir`, SLURM's and the local executor's, oldest first."""
    found = []
    for executor, record in zip(("slurm", "local"), RECORDS):
        found += [Launched(run_dir, executor, e) for e in read_json_list(run_dir / record)]
    return sorted(found, key=lambda j: j.when)


def records(run: str | None, output_root: str) -> list[Path]:
    """Run directories with a record of launched jobs: RUN is a run directory (or a folder above some), or a run id
    looked up under output_root (a pipeline's stages share one); None gives the 20 newest."""
    if run is not None and Path(run).is_dir():
        paths = [p for r in RECORDS for p in Path(run).glob(r)] or [
            p for r in RECORDS for p in Path(run).glob(f"**/{r}")
        ]
    else:
        paths = [p for r in RECORDS for p in Path(output_root).glob(f"*/*/{run or '*'}/{r}")]
    dirs = sorted({p.parent.parent for p in paths}, key=lambda d: min(j.when for j in launched(d)))
    return dirs if run is not None else dirs[-20:]


def summarize(states: list[TaskState]) -> str:
    if len(states) == 1:
        s = states[0]
        extra = [
            f"exit {s.exit_code}" if s.exit_code else "",
            f"restarts {s.restarts}" if s.restarts else "",
            f"({s.reason})" if s.reason and s.reason != "None" else "",
            s.nodes if s.nodes != "(null)" else "",
        ]
        return " ".join([s.state, *(e for e in extra if e)])
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    return ", ".join(f"{state} x{n}" for state, n in counts.items())


def _alive(pid: int | None, host: str) -> bool:
    if pid is None or host != platform.node():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def task_state(entry: dict, task: dict) -> str:
    """A local task: its recorded exit code, RUNNING while its process lives, else ended unrecorded (killed)."""
    if task["exit_code"] is not None:
        return "COMPLETED" if task["exit_code"] == 0 else f"FAILED exit {task['exit_code']}"
    if _alive(task["pid"], entry["host"]):
        return "RUNNING"
    return "ENDED unrecorded" if entry["host"] == platform.node() else f"started on {entry['host']}"


def local_state(entry: dict) -> str:
    states = [task_state(entry, t) for t in entry["tasks"]]
    if len(states) == 1:
        pid = entry["tasks"][0]["pid"]
        return f"{states[0]} pid {pid}" if states[0] == "RUNNING" else states[0]
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{state} x{n}" for state, n in counts.items())


def job_line(job: Launched, last: bool) -> str:
    """The job's state; where SLURM (or the record) no longer tells it, COMPLETE.json does: the last job of a
    complete run completed it."""
    array = f" (array of {job.entry['array']})" if job.entry.get("array") else ""
    if job.executor == "local":
        state = local_state(job.entry)
        known, where = "unrecorded" not in state, "local"
    else:
        states = job_states(job.entry["job_id"])
        state, known = (summarize(states), True) if states else ("", False)
        where = f"job {job.entry['job_id']}"
    if not known:
        why = "SLURM no longer knows the job" if job.executor == "slurm" else "its launcher stopped before the exit"
        state = (
            f"COMPLETED per COMPLETE.json ({why})"
            if is_complete(job.run_dir) and last
            else "ended; a later launch completed the run"
            if is_complete(job.run_dir)
            else f"ended, outcome unknown ({why}); the run is not complete: see `logs`"
        )
    return f"    {job.name:<14} {where:<14} {state}{array}"


def status_lines(run_dirs: list[Path]) -> list[str]:
    """Per run id, once: each stage's run directory, whether it is complete, and its jobs' states."""
    lines: list[str] = []
    for (root, run_id), dirs in _by_run(run_dirs).items():
        lines.append(f"run {run_id}  ({root})")
        for d in dirs:
            lines.append(f"  {d.parent.name:<10} {'complete' if is_complete(d) else 'not complete':<13} {d}")
            jobs = launched(d)
            lines += [job_line(j, last=not any(k.name == j.name for k in jobs[i + 1 :])) for i, j in enumerate(jobs)]
    hint = tensorboard_hint(run_dirs)
    return lines + ([hint] if hint else [])


def _by_run(run_dirs: list[Path]) -> dict[tuple[Path, str], list[Path]]:
    groups: dict[tuple[Path, str], list[Path]] = {}
    for d in run_dirs:
        groups.setdefault((d.parent.parent, d.name), []).append(d)
    return groups


def tensorboard_hint(run_dirs: list[Path]) -> str | None:
    """`tensorboard --logdir DIR` for the runs that hold TensorBoard events (DIR: the one run, or the folder above
    them all); None when none does (prepare, or jobs that have not written any yet)."""
    with_events = [d for d in run_dirs if next(d.glob("tensorboard/**/events.out.tfevents.*"), None)]
    if not with_events:
        return None
    logdir = with_events[0] if len(with_events) == 1 else Path(os.path.commonpath([d.absolute() for d in with_events]))
    return f"TensorBoard: tensorboard --logdir {logdir}"


def log_files(run_dir: Path, entry: dict, task: int) -> list[Path]:
    """submitit's per-task logs: `<id>_<task>_log.{err,out}`; for arrays task = array index, node task 0."""
    stem = f"{entry['job_id']}_{task}_0" if entry.get("array") else f"{entry['job_id']}_{task}"
    return [run_dir / "slurm" / f"{stem}_log.{ext}" for ext in ("err", "out")]


def job_logs(job: Launched, task: int) -> list[Path]:
    """The log files of `job`'s task (array index, or node number on SLURM) that exist."""
    if job.executor == "local":
        files = [job.run_dir / "logs" / local.log_name(job.name, task if job.entry.get("array") else None)]
    else:
        files = log_files(job.run_dir, job.entry, task)
    return [f for f in files if f.exists()]
