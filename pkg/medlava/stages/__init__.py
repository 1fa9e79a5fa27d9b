"""The stages, one module each (`medlava.stages.<name>.run(cfg, dist)`), and the one registry that the CLI,
the launcher, the job builder and the run directories read. Importing this package loads no model code."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    section: str
    """The config section that configures it (`cfg.<section>`)."""
    vlm: bool
    """Runs the VLM of the `model:` section."""
    trains: bool
    """Trains: one process per GPU under torchrun, on cluster.nodes nodes; checkpoints and resumes."""
    upstream: str | None
    """The stage whose newest complete run `latest` means in this stage's section."""

    @property
    def distributed(self) -> bool:
        """Sets up torch.distributed (a device and, under torchrun, a process group)."""
        return self.vlm or self.trains

    def run(self, cfg, dist=None, **options):
        return importlib.import_module(f"medlava.stages.{self.name}").run(cfg, dist, **options)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "data", vlm=False, trains=False, upstream=None),
    Stage("align", "align", vlm=True, trains=True, upstream="prepare"),
    Stage("sft", "sft", vlm=True, trains=True, upstream="align"),  # sft.init_from=latest: the aligned projector
    Stage("infer", "infer", vlm=True, trains=False, upstream="sft"),
    Stage("eval", "eval", vlm=False, trains=False, upstream="infer"),
    Stage("suite", "suite", vlm=True, trains=False, upstream="sft"),  # infer.checkpoint: the model it scores
    Stage("cnn", "cnn", vlm=False, trains=True, upstream="prepare"),
    Stage("pretrain", "pretrain", vlm=False, trains=True, upstream="prepare"),
)}
CHAIN = ("prepare", "align", "sft", "infer", "eval")
"""The VLM pipeline (`demo`, `pipeline`), in order."""


def upstream(stage: str) -> str:
    up = STAGES[stage].upstream
    if up is None:
        raise ValueError(f"{stage} reads no other stage's output")
    return up
