"""Stop-and-requeue requests. SLURM sends SIGUSR2 before a time limit or preemption (`--signal`); the
training loop polls `requested()` at step boundaries, saves a checkpoint, and exits with EXIT_REQUEUE so
the job's node task requeues it. Knows nothing of SLURM or models."""

from __future__ import annotations

import signal
import threading

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"
_event = threading.Event()


def _handler(signum, frame) -> None:
    _event.set()


def install(signals: tuple[int, ...] = (signal.SIGUSR2,)) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            signal.signal(sig, _handler)


def requested() -> bool:
    return _event.is_set()
