"""`medlava STAGE --config FILE [key=value ...]`: run one stage in this process (what a job executes).

Tools with their own options: `medlava doctor`, `medlava check-model`, `medlava convert`, and the scoring
commands `medlava eval --predictions CSV --out DIR`, `medlava metrics`, `medlava label-reports`; `medlava predict`,
`medlava serve` and `medlava compare` (each takes --help).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from medlava.config import Config, ConfigError, load_config
from medlava.io import InputError
from medlava.runs import new_run_id
from medlava.stages import STAGES

TOOLS = {"doctor": "medlava.doctor", "check-model": "medlava.models.check", "convert": "medlava.models.convert",
         "export": "medlava.models.export", "predict": "medlava.predict", "serve": "medlava.serve.app",
         "compare": "medlava.compare"}


def run_stage(stage: str, cfg: Config, **options) -> Path:
    """`stage`'s run(cfg, dist) in this process; torch.distributed is set up for the stages that need it."""
    from medlava import distributed

    s = STAGES[stage]
    if not s.distributed:
        return s.run(cfg, None, **options)
    d = distributed.setup()
    try:
        return s.run(cfg, d, **options)
    finally:
        distributed.teardown()


def _has_config(argv: list[str]) -> bool:
    return any(a == "--config" or a.startswith("--config=") for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:  # each tool parses its own options; the stage parser stays as it is
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    if argv and argv[0] in ("metrics", "label-reports") or (argv[:1] == ["eval"] and not _has_config(argv)):
        from medlava.eval.cli import main as scoring_main  # `medlava eval --predictions ...` needs no config
        return scoring_main(argv)
    parser = argparse.ArgumentParser(prog="medlava", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", required=True, help="YAML recipe (jobs/configs/*.yaml)")
    parser.add_argument("--chunk-idx", type=int, help="infer, suite: answer only this chunk (a job-array task)")
    parser.add_argument("--merge-only", action="store_true", help="infer, suite: merge finished chunks and stop")
    parser.add_argument("--prepare-only", action="store_true", help="suite: prepare the benchmarks (cached) and stop")
    parser.add_argument("--check", action="store_true",
                        help="prepare: list every problem in the data in one pass, write no samples; exit 1 if any")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.lr=2e-4")
    args = parser.parse_intermixed_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.run_id is None:
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:
                raise ConfigError("run_id is not set: every rank must agree on the run directory, "
                                  "pass run_id=... (launch/submit.py does)")
            cfg.run_id = new_run_id()
        if args.chunk_idx is not None and not 0 <= args.chunk_idx < cfg.infer.chunks:
            raise ConfigError(f"--chunk-idx {args.chunk_idx} is outside 0..{cfg.infer.chunks - 1} (infer.chunks)")
        if args.check:
            if args.stage != "prepare":
                raise ConfigError(f"--check is an option of prepare, not {args.stage}")
            report = json.loads((run_stage("prepare", cfg, check=True) / "prepare_report.json").read_text())
            return 0 if report["ok"] else 1
        options = {"chunk_idx": args.chunk_idx, "merge_only": args.merge_only} if args.stage in ("infer", "suite") else {}
        if args.stage == "suite":
            options["prepare_only"] = args.prepare_only
        run_stage(args.stage, cfg, **options)
    except (ConfigError, InputError, FileNotFoundError) as e:
        print(f"medlava {args.stage}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
