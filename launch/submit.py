#!/usr/bin/env python
"""Submit a medlava stage: parse, validate the config, hand the jobs to an executor.

    python launch/submit.py sft --config jobs/configs/tiny.yaml --gpus 2 train.lr=2e-4
    python launch/submit.py demo --config jobs/configs/tiny.yaml          # prepare -> align -> sft -> infer -> eval
    python launch/submit.py infer --config ... --chunks 16 --dry-run       # print config + commands, run nothing
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from medlava.cluster.jobs import CHAIN, stage_jobs
from medlava.cluster.local import JobFailed, run_local
from medlava.config import ConfigError, dump_config, load_config
from medlava.runs import new_run_id, stage_root


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*CHAIN, "demo"])
    p.add_argument("--config", required=True, help="YAML recipe, e.g. jobs/configs/tiny.yaml")
    p.add_argument("--executor", choices=["local", "slurm"],
                   help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--nodes", type=int, help="cluster.nodes")
    p.add_argument("--gpus", type=int, help="GPUs (processes) per node: cluster.gpus_per_node")
    p.add_argument("--output-root", help="where run directories go (a shared file system on clusters)")
    p.add_argument("--chunks", type=int, help="infer: split the answers into this many job-array tasks")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and commands; run nothing")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=2e-4")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.nodes, "cluster.nodes"), (args.gpus, "cluster.gpus_per_node"),
                      (args.output_root, "output_root"), (args.chunks, "infer.chunks")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    if cfg.run_id is None:  # every job of this launch writes under one run id
        cfg.run_id = new_run_id()
        overrides.append(f"run_id={cfg.run_id}")
    executor = args.executor or (cfg.cluster.executor if cfg.cluster.executor != "auto" else
                                 "slurm" if shutil.which("sbatch") else "local")
    jobs = stage_jobs(args.stage, args.config, overrides, cfg)
    run_dirs = {j.name: stage_root(cfg, j.stage) / cfg.run_id for j in jobs}

    if args.dry_run:
        print("# resolved config\n" + dump_config(cfg))
        print(f"# executor: {executor}; run id {cfg.run_id}; commands in order:")
        for j in jobs:
            array = f"  # array of {j.array}: task i adds --chunk-idx i" if j.array else ""
            print(j.shell(0 if j.array else None) + array)
        return 0
    if executor == "slurm":
        print("submit: the slurm executor is not available yet; use --executor local", file=sys.stderr)
        return 2
    try:
        run_local(jobs, run_dirs, parallelism=cfg.cluster.array_parallelism, env_extra=cfg.cluster.env)
    except JobFailed as e:
        print(f"submit: {e}", file=sys.stderr)
        return 1
    print("\nOutputs:")
    for stage, path in dict((j.stage, run_dirs[j.name]) for j in jobs).items():
        print(f"  {stage:8s} {path}")
    last = run_dirs[jobs[-1].name]
    if (last / "metrics.json").exists():
        m = json.loads((last / "metrics.json").read_text())
        print(f"\nmetrics.json: accuracy {m['accuracy']:.3f}  macro_f1 {m['macro_f1']:.3f}  "
              f"macro_auc {m['macro_auc'] if m['macro_auc'] is None else round(m['macro_auc'], 3)}")
    print(f"TensorBoard: tensorboard --logdir {Path(cfg.output_root) / cfg.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
