"""`medlava STAGE --config FILE [key=value ...]`: run one stage in this process (what a job executes).

`medlava submit STAGE ...` is the launcher (the same as `python launch/submit.py`). Tools with their own options:
`medlava doctor`, `medlava check-model`, `medlava convert`, `medlava export`, `medlava weights` (stage and check
the report metrics' weights), and the scoring commands
`medlava eval --predictions CSV --out DIR`, `medlava metrics`, `medlava label-reports`; `medlava predict`,
`medlava serve` and `medlava compare` (each takes --help).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

from medlava.config import Config, ConfigError, load_config
from medlava.io import InputError
from medlava.quiet import silence_known_warnings
from medlava.runs import check_reuse, new_run_id, run_dir
from medlava.stages import CHAIN, OPTIONS, STAGES, CheckFailed

TOOLS = {
    "doctor": "medlava.tools.doctor",
    "check-model": "medlava.tools.check_model",
    "convert": "medlava.tools.convert",
    "export": "medlava.tools.export",
    "predict": "medlava.tools.predict",
    "serve": "medlava.serve.app",
    "compare": "medlava.tools.compare",
    "submit": "medlava.cluster.submit",
    "weights": "medlava.tools.weights",
}


def run_stage(stage: str, cfg: Config, **options) -> Path:
    """`stage`'s run(cfg, dist) in this process; torch.distributed is set up for the stages that need it."""
    from medlava import distributed

    s = STAGES[stage]
    # A run this launch may not continue is refused at once, by every rank before any of them starts it (the stage's
    # start_run checks again): not after loading the model.
    check_reuse(run_dir(cfg, stage), stage, *s.reuse(cfg))
    if not s.distributed:
        return s.run(cfg, None, **options)
    dist = distributed.setup()
    try:
        return s.run(cfg, dist, **options)
    finally:
        distributed.teardown()


def _has_config(argv: list[str]) -> bool:
    return any(a == "--config" or a.startswith("--config=") for a in argv)


def stage_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medlava", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", required=True, help="YAML recipe (jobs/configs/*.yaml)")
    for o in OPTIONS.values():
        takers = ", ".join(s.name for s in STAGES.values() if o.name in s.options)
        kind = {"action": "store_true"} if o.type is bool else {"type": o.type}
        parser.add_argument(o.flag, dest=o.name, help=f"{takers}: {o.help}", **kind)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.lr=2e-4")
    return parser


def stage_options(args: argparse.Namespace, cfg: Config) -> dict:
    """The stage's own options as run() keywords; an option of another stage is refused."""
    stage = STAGES[args.stage]
    for o in OPTIONS.values():
        if o.name not in stage.options and getattr(args, o.name) not in (None, False):
            raise ConfigError(
                f"{o.flag} is an option of "
                f"{', '.join(s.name for s in STAGES.values() if o.name in s.options)}, not {stage.name}"
            )
    if stage.array and args.chunk_idx is not None and not 0 <= args.chunk_idx < stage.tasks(cfg):
        raise ConfigError(
            f"--chunk-idx {args.chunk_idx} is outside 0..{stage.tasks(cfg) - 1} ({stage.key(stage.array)})"
        )
    return {name: getattr(args, name) for name in stage.options}


def summary(module: str) -> str:
    """The first paragraph of a module's docstring without its `name`: prefix, read from the source: importing
    the stages and tools would load torch and transformers for a help screen."""
    origin = importlib.util.find_spec(module).origin
    doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    return re.sub(r"^(The )?`[^`]+`( stage)?( \([^)]*\))?: ", "", text)


def overview() -> str:
    """What `medlava` alone prints: the ways to call it, the stages in pipeline order, the tools."""
    width = max(60, shutil.get_terminal_size().columns - 1)

    def rows(names: dict[str, str]) -> list[str]:
        pad = max(map(len, names)) + 2
        return [
            f"  {n:<{pad}}" + textwrap.shorten(summary(m), width - pad - 2, placeholder=" ...")
            for n, m in names.items()
        ]

    stages = {s: f"medlava.stages.{s}" for s in [*CHAIN, *(s for s in STAGES if s not in CHAIN)]}
    return "\n".join(
        [
            "usage: medlava STAGE --config FILE [key=value ...]   run one stage in this process (what a job runs)",
            "       medlava submit STAGE --config FILE [...]      launch stages here or on SLURM; status, logs, cancel",
            "       medlava TOOL [...]                            each takes --help",
            "",
            f"stages ({' -> '.join(CHAIN)} is the chain `medlava submit demo|pipeline` runs):",
            *rows(stages),
            "",
            "tools:",
            *rows({t: m for t, m in TOOLS.items() if t != "submit"}),
            "  eval --predictions CSV --out DIR, metrics, label-reports: scoring that needs no config",
            "",
            "first run: medlava submit demo --config jobs/configs/tiny.yaml --executor local   (README.md: the rest)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    silence_known_warnings()
    if argv in ([], ["-h"], ["--help"]):
        print(overview())
        return 0
    if argv and argv[0] in TOOLS:  # each tool parses its own options; the stage parser stays as it is
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    if argv and argv[0] in ("metrics", "label-reports") or (argv[:1] == ["eval"] and not _has_config(argv)):
        from medlava.eval.cli import (
            main as scoring_main,  # `medlava eval --predictions ...` needs no config
        )

        return scoring_main(argv)
    args = stage_parser().parse_intermixed_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.run_id is None:
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:
                raise ConfigError(
                    "run_id is not set: every rank must agree on the run directory, "
                    "pass run_id=... (launch/submit.py does)"
                )
            cfg.run_id = new_run_id()
        run_stage(args.stage, cfg, **stage_options(args, cfg))
    except CheckFailed:
        return 1
    except (ConfigError, InputError, FileNotFoundError) as e:
        who = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""  # which process said it first
        print(f"medlava {args.stage}{who}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
