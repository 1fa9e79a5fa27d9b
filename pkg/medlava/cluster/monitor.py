"""Job states and logs of submitted runs: `launch/submit.py status|logs|cancel`, and waiting in tests.

States come from sacct when accounting works, else from `scontrol show job` (and `squeue -t all`), which
know a job only for MinJobAge after it ends; past that the run directory's COMPLETE.json still tells
whether the stage finished."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from medlava.cluster.slurm import RECORD
from medlava.runs import is_complete

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT"}


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
    return [TaskState(jid, state.split()[0], code, None, reason, nodes, start, end, "sacct")
            for jid, state, code, nodes, start, end, reason in rows]


def scontrol_fields(line: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict; values run to the next ` Key=`."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z/:_]*)=", line))
    return {m.group(1): line[m.end(): keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
            for i, m in enumerate(keys)}


def _scontrol(job_id: str) -> list[TaskState]:
    out = _run(["scontrol", "show", "job", "-o", job_id])
    states = []
    for line in (out or "").splitlines():
        f = scontrol_fields(line)
        if "JobState" not in f:
            continue
        jid = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if "ArrayTaskId" in f else f["JobId"]
        states.append(TaskState(jid, f["JobState"], f.get("ExitCode", ""), int(f.get("Restarts", 0)),
                                f.get("Reason", ""), f.get("NodeList", ""), f.get("StartTime", ""),
                                f.get("EndTime", ""), "scontrol"))
    return states


def _squeue(job_id: str) -> list[TaskState]:
    out = _run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T|%r|%N"])
    return [TaskState(jid, state, reason=reason, nodes=nodes, source="squeue")
            for jid, state, reason, nodes in (line.split("|") for line in (out or "").splitlines()
                                              if line.count("|") == 3)]


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
            raise TimeoutError(f"jobs not finished after {timeout:.0f} s: "
                               + "; ".join(f"{j}: {[t.state for t in s]}" for j, s in states.items()))
        time.sleep(poll)


# --- runs and their records ---------------------------------------------------------------------------

def records(run: str | None, output_root: str) -> list[Path]:
    """Run directories with a slurm record: RUN is a run directory (or a folder above some), or a run id
    looked up under output_root (a pipeline's stages share one); None gives the 20 newest."""
    if run is not None and Path(run).is_dir():
        found = list(Path(run).glob(f"slurm/{RECORD}")) or list(Path(run).glob(f"**/slurm/{RECORD}"))
    elif run is not None:
        found = list(Path(output_root).glob(f"*/*/{run}/slurm/{RECORD}"))
    else:
        found = list(Path(output_root).glob(f"*/*/*/slurm/{RECORD}"))
    found.sort(key=lambda p: min(int(e["job_id"]) for e in read_record(p.parent.parent)))
    return [p.parent.parent for p in (found if run is not None else found[-20:])]


def read_record(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "slurm" / RECORD).read_text())


def summarize(states: list[TaskState]) -> str:
    if not states:
        return "unknown to SLURM now (ended over MinJobAge ago, no accounting)"
    if len(states) == 1:
        s = states[0]
        extra = [f"exit {s.exit_code}" if s.exit_code else "", f"restarts {s.restarts}" if s.restarts else "",
                 f"({s.reason})" if s.reason and s.reason != "None" else "", s.nodes if s.nodes != "(null)" else ""]
        return " ".join([s.state, *(e for e in extra if e)])
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    return ", ".join(f"{state} x{n}" for state, n in counts.items())


def status_lines(run_dirs: list[Path]) -> list[str]:
    lines = []
    for d in run_dirs:
        complete = "complete" if is_complete(d) else "not complete"
        lines.append(f"{d}  [{complete}]")
        for e in read_record(d):
            array = f" (array of {e['array']})" if e.get("array") else ""
            lines.append(f"  {e['name']:<14} job {e['job_id']:<8}{array}  {summarize(job_states(e['job_id']))}")
    return lines


def log_files(run_dir: Path, entry: dict, task: int) -> list[Path]:
    """submitit's per-task logs: `<id>_<task>_log.{err,out}`; for arrays task = array index, node task 0."""
    stem = f"{entry['job_id']}_{task}_0" if entry.get("array") else f"{entry['job_id']}_{task}"
    return [run_dir / "slurm" / f"{stem}_log.{ext}" for ext in ("err", "out")]
