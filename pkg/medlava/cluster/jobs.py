"""What a launch is made of: the jobs of a stage (or of the whole demo chain) and the exact command
each one runs. Knows nothing of models; the executors (local, slurm) run these."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from medlava.config import Config

CHAIN = ("prepare", "align", "sft", "infer", "eval")
TRAINING = ("align", "sft")


@dataclass
class Job:
    name: str
    stage: str
    argv: list[str]
    nodes: int = 1
    gpus_per_node: int = 0
    array: int | None = None
    """Job-array size: task i runs `argv` with `--chunk-idx i`."""
    after: list[str] = field(default_factory=list)

    def task_argv(self, idx: int | None) -> list[str]:
        return self.argv if idx is None else [*self.argv, "--chunk-idx", str(idx)]

    def shell(self, idx: int | None = None) -> str:
        return shlex.join(self.task_argv(idx))


def worker_argv(stage: str, config_path: str, overrides: list[str], cfg: Config, python: str = sys.executable,
                distributed: bool = False) -> list[str]:
    """`python -m medlava STAGE ...`, under torchrun when the stage trains on more than one process."""
    tail = ["-m", "medlava", stage, "--config", config_path, *overrides]
    procs = max(cfg.cluster.gpus_per_node, 1)
    if not distributed or cfg.cluster.nodes * procs == 1:
        return [python, *tail]
    if cfg.cluster.nodes == 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *tail]
    raise NotImplementedError("multi-node runs go through the slurm executor (it supplies the rendezvous)")


def stage_jobs(stage: str, config_path: str, overrides: list[str], cfg: Config) -> list[Job]:
    """The jobs for `stage`; `demo` is the whole chain. Each job depends on the one before it."""
    jobs: list[Job] = []
    for s in CHAIN if stage == "demo" else (stage,):
        after = [jobs[-1].name] if jobs else []
        if s == "infer" and cfg.infer.chunks > 1:
            argv = worker_argv("infer", config_path, overrides, cfg)
            jobs.append(Job("infer-chunks", "infer", argv, gpus_per_node=min(cfg.cluster.gpus_per_node, 1),
                            array=cfg.infer.chunks, after=after))
            jobs.append(Job("infer-merge", "infer", [*argv, "--merge-only"], after=[jobs[-1].name]))
        elif s in TRAINING:
            jobs.append(Job(s, s, worker_argv(s, config_path, overrides, cfg, distributed=True),
                            nodes=cfg.cluster.nodes, gpus_per_node=cfg.cluster.gpus_per_node, after=after))
        else:
            jobs.append(Job(s, s, worker_argv(s, config_path, overrides, cfg),
                            gpus_per_node=min(cfg.cluster.gpus_per_node, 1) if s == "infer" else 0, after=after))
    return jobs
