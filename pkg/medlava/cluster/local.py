"""The local executor: runs a launch's jobs on this machine as subprocesses, in dependency order, with job-array
tasks side by side.

A job's output reaches the terminal as it is written, `\\r` redraws included: through a pseudo-terminal when ours
is one, so tqdm and logging behave exactly as when the stage runs directly; else through a pipe read as bytes
arrive. Array tasks write to their logs only, and one status line shows each running task's latest progress
(e.g. answers/s per infer chunk). Every task's output is also kept in `<run dir>/logs/`, and `logs/local.json`
records each job's commands, process ids and exit codes for `launch/submit.py status|logs`."""

from __future__ import annotations

import fcntl
import os
import platform
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medlava.cluster.jobs import Job
from medlava.io import atomic_write_json, read_json_list

RECORD = "local.json"
"""In `<run dir>/logs/`: the jobs this executor ran there (monitor.py reads it)."""


class JobFailed(RuntimeError):
    pass


def log_name(job: str, idx: int | None) -> str:
    return f"{job}.log" if idx is None else f"{job}_{idx}.log"


class Record:
    """`logs/local.json`: one entry per job run into this directory, its tasks' commands, pids and exit codes."""

    def __init__(self, log_dir: Path, job: Job):
        self.path, self.lock = log_dir / RECORD, threading.Lock()
        entries = read_json_list(self.path)
        tasks = range(job.array) if job.array else [None]
        self.entry = {
            "name": job.name,
            "array": job.array,
            "host": platform.node(),
            "started": time.strftime("%FT%T%z"),
            "ended": None,
            "tasks": [
                {"idx": i, "command": job.shell(i), "log": log_name(job.name, i), "pid": None, "exit_code": None}
                for i in tasks
            ],
        }
        self.entries = [*entries, self.entry]
        self._write()

    def update(self, idx: int | None, **fields) -> None:
        with self.lock:
            next(t for t in self.entry["tasks"] if t["idx"] == idx).update(fields)
            if all(t["exit_code"] is not None for t in self.entry["tasks"]):
                self.entry["ended"] = time.strftime("%FT%T%z")
            self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, self.entries)


def _spawn(argv: list[str], env: dict[str, str], terminal: bool) -> tuple[subprocess.Popen, int]:
    """The process and the descriptor its output (stdout and stderr) is read from: a pseudo-terminal of our
    terminal's size when `terminal`, else a pipe."""
    if not terminal:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        return proc, proc.stdout.fileno()
    master, slave = pty.openpty()
    cols, rows = shutil.get_terminal_size()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # pass "\n" as written (a tty would send "\r\n"); our own terminal translates
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    except OSError:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return proc, master


def _chunks(fd: int) -> Iterator[bytes]:
    """What the process writes, as soon as it is written (a line-by-line read would hold tqdm's `\\r` redraws)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: every holder of the pseudo-terminal's other end has exited
            return
        if not data:
            return
        yield data


def _run_task(
    job: Job,
    idx: int | None,
    log_dir: Path,
    env: dict[str, str],
    record: Record,
    sink: Callable[[bytes], None],
    terminal: bool,
) -> int:
    proc, fd = _spawn(job.argv(idx), env, terminal)
    record.update(idx, pid=proc.pid)
    code = None
    try:
        with (log_dir / log_name(job.name, idx)).open("ab") as log:
            for data in _chunks(fd):
                log.write(data)
                log.flush()
                sink(data)
        code = proc.wait()
    finally:
        if terminal:
            os.close(fd)
        else:
            proc.stdout.close()
        code = proc.poll() if code is None else code
        if code is not None:
            record.update(idx, exit_code=code)
    return code


def _echo(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


class ArrayView:
    """One status line for a job array: each running task's latest progress line, its bar graphic left out
    (`[0] chunk 0/4: 40% 20/50 [00:04<00:06, 4.9answer/s] | [1] ...`). On a terminal it is redrawn in place
    twice a second; in a log, printed every 30 s. A task's last line is printed when it ends."""

    def __init__(self, job: Job, terminal: bool):
        self.job, self.terminal = job, terminal
        self.latest: dict[int, str] = {}
        self.running: set[int] = set()
        self.lock = threading.Lock()
        self.interval, self.drawn = (0.5 if terminal else 30.0), 0.0

    @staticmethod
    def compact(segment: str) -> str:
        """A tqdm bar without its graphic, a log line (cli's format) without its time and logger."""
        segment = re.sub(r"^\d\d:\d\d:\d\d \[rank \d+\] [\w.]+: ", "", segment.strip())
        return " ".join(re.sub(r"\|[^|]*\|", " ", segment).split())

    def feed(self, idx: int, data: bytes) -> None:
        segments = [s for s in re.split(r"[\r\n]", data.decode(errors="replace")) if s.strip()]
        with self.lock:
            self.running.add(idx)
            if segments:
                self.latest[idx] = self.compact(segments[-1])
            if time.monotonic() - self.drawn >= self.interval:
                self._draw()

    def line(self) -> str:
        return " | ".join(f"[{i}] {self.latest.get(i, 'starting')}" for i in sorted(self.running))

    def _draw(self) -> None:
        self.drawn = time.monotonic()
        if self.terminal:
            width = shutil.get_terminal_size().columns - 1
            sys.stdout.write("\r" + self.line()[:width] + "\x1b[K")
        else:
            sys.stdout.write(f"    {self.job.name}: {self.line()}\n")
        sys.stdout.flush()

    def done(self, idx: int, code: int, log: Path) -> None:
        with self.lock:
            self.running.discard(idx)
            clear = "\r\x1b[K" if self.terminal else ""
            result = "done" if code == 0 else f"FAILED (exit {code}; see {log})"
            sys.stdout.write(f"{clear}    task {idx} {result}: {self.latest.get(idx, '(no output)')}\n")
            if self.running:
                self._draw()
            sys.stdout.flush()


def _run_array(
    job: Job, log_dir: Path, env: dict[str, str], record: Record, parallelism: int, terminal: bool
) -> list[str]:
    view = ArrayView(job, terminal)

    def task(i: int) -> str | None:
        code = _run_task(job, i, log_dir, env, record, lambda data: view.feed(i, data), terminal)
        view.done(i, code, log_dir / log_name(job.name, i))
        return None if code == 0 else f"{job.name} task {i} exited with {code}; see {log_dir / log_name(job.name, i)}"

    with ThreadPoolExecutor(max_workers=min(parallelism, job.array)) as pool:
        return [e for e in pool.map(task, range(job.array)) if e]


def run_local(jobs: list[Job], run_dirs: dict[str, Path], parallelism: int, env_extra: dict[str, str]) -> None:
    terminal = sys.stdout.isatty()
    # print() in a stage reaches a pipe as it happens, not when the buffer fills
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    for job in jobs:
        log_dir = run_dirs[job.name] / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        record = Record(log_dir, job)
        first = job.shell() if job.array is None else f"{job.shell(0)} (task 0 of {job.array})"
        print(f"==> {job.name}: {first}", flush=True)
        if job.array is None:
            code = _run_task(job, None, log_dir, env, record, _echo, terminal)
            if code != 0:
                raise JobFailed(f"{job.name} exited with {code}; see {log_dir / log_name(job.name, None)}")
            continue
        errors = _run_array(job, log_dir, env, record, parallelism, terminal)
        if errors:
            raise JobFailed("; ".join(errors))
        print(f"    {job.array} tasks done; logs in {log_dir}", flush=True)
