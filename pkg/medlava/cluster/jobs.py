"""What a launch is made of: the jobs of a stage (or of a chain of stages) and the exact command each one
runs. Knows nothing of models or schedulers; the executors (local, slurm) run these."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from medlava.config import Config
from medlava.stages import OPTIONS, STAGES

TORCHRUN = "torch.distributed.run"  # `python -m torch.distributed.run` is torchrun, from the same interpreter


@dataclass(frozen=True)
class Rendezvous:
    """Where the torchrun agents of a multi-node job meet (c10d). The slurm node task fills it from SLURM's
    environment; a dry run fills it with the shell names of those values."""

    node_rank: str
    host: str
    port: str
    job_id: str


def worker_argv(
    args: Sequence[str],
    nodes: int = 1,
    procs_per_node: int = 1,
    python: str = sys.executable,
    rdzv: Rendezvous | None = None,
) -> list[str]:
    """`python -m medlava ARGS`, under torchrun when the job has more than one process: `--standalone` on
    one node, a c10d rendezvous at `rdzv` across nodes (one torchrun per node)."""
    tail = ["-m", "medlava", *args]
    if nodes * procs_per_node == 1:
        return [python, *tail]
    run = [python, "-m", TORCHRUN, f"--nproc_per_node={procs_per_node}"]
    if nodes == 1:
        return [*run, "--standalone", *tail]
    if rdzv is None:
        raise ValueError(
            f"a {nodes}-node job needs a rendezvous host: submit it with --executor slurm, "
            "which starts one torchrun per node and supplies it"
        )
    # --node_rank only matters for a static rendezvous; c10d ranks the agents itself. It is passed so the
    # command line says where it runs (as NeMo-Run and TorchX do).
    return [
        *run,
        f"--nnodes={nodes}",
        f"--node_rank={rdzv.node_rank}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rdzv.host}:{rdzv.port}",
        f"--rdzv_id={rdzv.job_id}",
        *tail,
    ]


@dataclass(frozen=True)
class Job:
    name: str
    stage: str
    args: list[str]
    """What follows `python -m medlava`: STAGE --config FILE [overrides] [--merge-only]."""
    nodes: int = 1
    procs_per_node: int = 1
    """Processes per node: torchrun starts them when nodes * procs_per_node > 1."""
    gpus_per_node: int = 0
    array: int | None = None
    """Job-array size: task i runs `args` with `--chunk-idx i`."""
    after: list[str] = field(default_factory=list)
    """Names of the jobs that must finish successfully first."""

    def task_args(self, idx: int | str | None) -> list[str]:
        return self.args if idx is None else [*self.args, "--chunk-idx", str(idx)]

    def argv(
        self, idx: int | str | None = None, python: str = sys.executable, rdzv: Rendezvous | None = None
    ) -> list[str]:
        return worker_argv(self.task_args(idx), self.nodes, self.procs_per_node, python, rdzv)

    def shell(self, idx: int | None = None) -> str:
        return shlex.join(self.argv(idx))


def stage_jobs(stages: Sequence[str], config_path: str, overrides: list[str], cfg: Config) -> list[Job]:
    """The jobs for `stages` in order; each depends on the one before it. Training runs on cluster.nodes
    nodes with one process per GPU (one per node on CPU); a stage with an array (stages.Stage.array) of K > 1
    tasks is a job array plus a merge job, after the stage's `before` job when it declares one."""
    gpus = cfg.cluster.gpus_per_node
    jobs: list[Job] = []
    for s in stages:
        stage = STAGES[s]
        after = [jobs[-1].name] if jobs else []
        args = [s, "--config", config_path, *overrides]
        one_gpu = min(gpus, 1) if stage.gpus == "one" else 0
        if stage.before:  # e.g. the suite's benchmarks prepared once, on CPUs, before any task answers
            jobs.append(
                Job(f"{s}-{stage.before.replace('_only', '')}", s, [*args, OPTIONS[stage.before].flag], after=after)
            )
            after = [jobs[-1].name]
        if stage.tasks(cfg) > 1:
            jobs.append(Job(f"{s}-chunks", s, args, gpus_per_node=one_gpu, array=stage.tasks(cfg), after=after))
            jobs.append(Job(f"{s}-merge", s, [*args, "--merge-only"], after=[f"{s}-chunks"]))
        elif stage.gpus == "node":
            jobs.append(
                Job(s, s, args, nodes=cfg.cluster.nodes, procs_per_node=max(gpus, 1), gpus_per_node=gpus, after=after)
            )
        else:
            jobs.append(Job(s, s, args, gpus_per_node=one_gpu, after=after))
    return jobs
