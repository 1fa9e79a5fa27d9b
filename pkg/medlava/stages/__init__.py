"""The stages, one module each (`medlava.stages.<name>.run(cfg, dist, **options)`), and the one registry that the
CLI, the launcher, the job builder and the run directories read. Importing this package loads no model code.

Invariants:
- A stage module owns its run: it starts the run directory, resolves its upstream runs, runs, and marks the run
  complete. Library packages (train, infer, eval, pretrain, data) are handed the directory and never start or
  complete one.
- No code outside a stage's own module names it: what differs between stages (their options, array jobs, what
  --check means, which upstream run the launcher pins) is declared here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


class CheckFailed(Exception):
    """A stage run with --check found problems (it has printed them); the process exits 1."""


@dataclass(frozen=True)
class Option:
    """A command-line option of some stages, passed to run() as the keyword `name`."""

    name: str
    flag: str
    type: type
    help: str


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option("chunk_idx", "--chunk-idx", int, "do only this chunk (a job-array task)"),
        Option("merge_only", "--merge-only", bool, "merge the finished chunks and stop (the job after an array)"),
        Option(
            "check", "--check", bool, "list every problem in the input in one pass, write no outputs; exit 1 if any"
        ),
        Option(
            "prepare_only", "--prepare-only", bool, "prepare the inputs (cached) and stop (the job before an array)"
        ),
    )
}


@dataclass(frozen=True)
class Input:
    """A config key naming an upstream run a stage reads: `latest` (the newest complete run of `stage`), a path, or
    one of `none` (nothing read)."""

    key: str
    """Dotted, e.g. `sft.init_from`."""
    stage: str
    none: tuple[str, ...] = ()
    unless: str | None = None
    """A key that, when set, is read instead (`infer.questions` replaces the prepared samples)."""

    def value(self, cfg: Any, key: str | None = None) -> Any:
        section, name = (key or self.key).split(".")
        return getattr(getattr(cfg, section), name)

    def read(self, cfg: Any) -> bool:
        """Whether `cfg` reads this input at all."""
        return self.value(cfg) not in self.none and not (self.unless and self.value(cfg, self.unless))


@dataclass(frozen=True)
class Stage:
    name: str
    section: str
    """The config section that configures it (`cfg.<section>`)."""
    vlm: bool
    """Runs the VLM of the `model:` section."""
    trains: bool
    """Trains: one process per GPU under torchrun, on cluster.nodes nodes; checkpoints and resumes."""
    inputs: tuple[Input, ...]
    """The upstream runs it reads: the launcher refuses a launch whose inputs do not exist yet, except those the
    launch itself makes."""
    options: tuple[str, ...] = ()
    """Names of the OPTIONS it takes."""
    array: str | None = None
    """A key of its section holding a task count K: K > 1 runs as a job array of K tasks (task i with
    `--chunk-idx i`) and then one merge job (`--merge-only`); the stage takes both options."""
    check: Literal["stage", "doctor"] = "doctor"
    """What `launch/submit.py STAGE --check` runs: the stage itself with --check, or `medlava doctor` on one node
    of what the stage's job would get."""
    pins: str | None = None
    """A key of its section naming an upstream run (`latest` or a path): the launcher resolves `latest` once, at
    submit time, for every job of the launch (array tasks must not see a newer run appear mid-array)."""
    keys_in: str | None = None
    """The section `array` and `pins` are keys of, when not its own (the suite answers with infer's settings)."""
    before: str | None = None
    """An option whose job runs once before the others (the suite prepares its benchmarks, then answers)."""
    one_gpu: bool = False
    """Takes one GPU although it runs no VLM (eval: the model-based report metrics)."""
    preflight: bool = False
    """Its module has `preflight(cfg) -> list[str]`: problems the launcher refuses before queueing anything,
    and `doctor_args(cfg) -> list[str]`: what its `--check` doctor job checks besides the environment."""

    def __post_init__(self) -> None:
        if self.array and not {"chunk_idx", "merge_only"} <= set(self.options):
            raise ValueError(f"stage {self.name}: an array stage takes --chunk-idx and --merge-only")
        if self.before and self.before not in self.options:
            raise ValueError(f"stage {self.name}: its `before` job is one of its options")

    @property
    def upstream(self) -> str | None:
        """The stage whose newest complete run `latest` means in the section of its `pins` key (its own, or
        `keys_in`)."""
        return next((i.stage for i in self.inputs if i.key.startswith(self.key(""))), None)

    def key(self, name: str) -> str:
        """The dotted key of `name` in the section its `array` and `pins` keys are in (`infer.chunks` for the suite)."""
        return f"{self.keys_in or self.section}.{name}"

    def reuse(self, cfg: Any) -> tuple[Literal["never", "unfinished"], str]:
        """Which run directory of an earlier launch (same run id) it continues, as runs.check_reuse takes it: an
        unfinished one, unless its section says resume=never (then the hint names the key); never a finished one."""
        if getattr(getattr(cfg, self.section), "resume", "auto") == "never":
            return "never", f" (or {self.section}.resume=auto to continue it)"
        return "unfinished", ""

    @property
    def distributed(self) -> bool:
        """Sets up torch.distributed (a device and, under torchrun, a process group)."""
        return self.vlm or self.trains

    @property
    def gpus(self) -> Literal["node", "one", "none"]:
        """GPUs a job of it takes: every GPU of each node (training), one (a VLM answering), or none."""
        return "node" if self.trains else "one" if self.vlm or self.one_gpu else "none"

    def settings(self, cfg: Any) -> Any:
        """The config section its `array` and `pins` keys are in (its own, unless `keys_in`)."""
        return getattr(cfg, self.keys_in or self.section)

    def tasks(self, cfg: Any) -> int:
        """How many array tasks it runs as (1: a single job)."""
        return int(getattr(self.settings(cfg), self.array)) if self.array else 1

    def run(self, cfg, dist=None, **options):
        return importlib.import_module(f"medlava.stages.{self.name}").run(cfg, dist, **options)

    def problems(self, cfg) -> list[str]:
        """What stops its jobs before they are queued (stages with `preflight`)."""
        return importlib.import_module(f"medlava.stages.{self.name}").preflight(cfg) if self.preflight else []

    def doctor_args(self, cfg) -> list[str]:
        return importlib.import_module(f"medlava.stages.{self.name}").doctor_args(cfg) if self.preflight else []


SAMPLES = Input("data.samples", "prepare")
CHECKPOINT = Input("infer.checkpoint", "sft", none=("base",))
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare", "data", vlm=False, trains=False, inputs=(), options=("check",), check="stage"),
        Stage("align", "align", vlm=True, trains=True, inputs=(SAMPLES,)),
        Stage("sft", "sft", vlm=True, trains=True, inputs=(SAMPLES, Input("sft.init_from", "align", none=("none",)))),
        Stage(
            "infer",
            "infer",
            vlm=True,
            trains=False,
            options=("chunk_idx", "merge_only"),
            array="chunks",
            pins="checkpoint",
            inputs=(Input("data.samples", "prepare", unless="infer.questions"), CHECKPOINT),
        ),
        Stage(
            "eval",
            "eval",
            vlm=False,
            trains=False,
            inputs=(Input("eval.predictions", "infer"),),
            options=("chunk_idx", "merge_only"),
            array="chunks",
            one_gpu=True,
            preflight=True,
        ),  # report metrics: an array of one-GPU tasks
        Stage(
            "suite",
            "suite",
            vlm=True,
            trains=False,
            inputs=(CHECKPOINT,),  # it prepares its benchmarks itself
            options=("chunk_idx", "merge_only", "prepare_only"),
            array="chunks",
            pins="checkpoint",
            keys_in="infer",
            before="prepare_only",
        ),
        Stage("cnn", "cnn", vlm=False, trains=True, inputs=(SAMPLES,)),
        Stage("pretrain", "pretrain", vlm=False, trains=True, inputs=(SAMPLES,)),
    )
}
CHAIN = ("prepare", "align", "sft", "infer", "eval")
"""The VLM pipeline (`demo`, `pipeline`), in order."""


def upstream(stage: str) -> str:
    up = STAGES[stage].upstream
    if up is None:
        raise ValueError(f"{stage} reads no other stage's output")
    return up
