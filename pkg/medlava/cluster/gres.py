"""GPUs in a node's sinfo GRES field (`%G`), the one parser doctor and the slurm executor share."""

from __future__ import annotations

import re


def parse_gres(gres: str) -> tuple[int, str]:
    """(total GPUs, GPU types joined with "+") of one node: `gpu:a100:4(S:0-1),gpu:v100:2` -> (6, "a100+v100");
    `gpu:8` -> (8, ""); `gpu` -> (1, ""); `shard:8`, `(null)` -> (0, ""). Every `gpu` entry counts: a node
    with two GPU types has the GPUs of both."""
    total, kinds = 0, []
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = entry.strip().split(":")
        if parts[0] != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
        if len(parts) == 3 or (len(parts) == 2 and not parts[1].isdigit()):
            kinds.append(parts[1])
    return total, "+".join(dict.fromkeys(kinds))
