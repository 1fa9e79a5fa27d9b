"""`medlava STAGE --config FILE [key=value ...]`: run one stage in this process (what a job executes)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medlava.config import Config, ConfigError, load_config
from medlava.io import InputError
from medlava.runs import new_run_id

STAGES = ("prepare", "align", "sft", "infer", "eval")


def run_stage(stage: str, cfg: Config, chunk_idx: int | None = None, merge_only: bool = False) -> None:
    from medlava import distributed

    if stage == "prepare":
        from medlava.stages import run_prepare
        run_prepare(cfg)
    elif stage == "eval":
        from medlava.stages import run_eval
        run_eval(cfg)
    else:
        d = distributed.setup()
        try:
            if stage == "infer":
                from medlava.infer.stage import run_infer
                run_infer(cfg, d, chunk_idx, merge_only)
            else:
                from medlava.train.stages import run_training_stage
                run_training_stage(cfg, stage, d)
        finally:
            distributed.teardown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medlava", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", required=True, help="YAML recipe (jobs/configs/*.yaml)")
    parser.add_argument("--chunk-idx", type=int, help="infer: answer only this chunk (a job-array task)")
    parser.add_argument("--merge-only", action="store_true", help="infer: merge finished chunks and stop")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=2e-4")
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
        run_stage(args.stage, cfg, args.chunk_idx, args.merge_only)
    except (ConfigError, InputError, FileNotFoundError) as e:
        print(f"medlava {args.stage}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
