"""What `sinfo` says of the partitions: one query and one parser, for `medlava doctor` and the slurm executor's
refusals. Nodes of a partition that look alike come on one line (sinfo groups them), so the lines are read as
groups of identical nodes."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

SINFO_FORMAT = "%P|%a|%D|%c|%m|%G"  # partition|availability|nodes|CPUs per node|memory MB per node|generic resources


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


@dataclass(frozen=True)
class NodeGroup:
    count: int
    cpus: int
    mem_mb: int
    gpus: int
    gpu_kind: str
    gres: str


@dataclass
class Partition:
    name: str
    default: bool
    available: str
    groups: list[NodeGroup] = field(default_factory=list)

    @property
    def nodes(self) -> list[tuple[int, int, str]]:
        """(nodes, GPUs per node, GPU type) of each group."""
        return [(g.count, g.gpus, g.gpu_kind) for g in self.groups]

    @property
    def gpus(self) -> int:
        return sum(g.count * g.gpus for g in self.groups)

    def describe(self) -> str:
        groups = ", ".join(f"{n}×{g} {t}".rstrip() if g else f"{n} without GPUs" for n, g, t in self.nodes)
        return f"{self.name}{'*' if self.default else ''} ({self.available}: {groups})"


def _count(field_: str) -> int:
    """sinfo's `64+` (the smallest of a group that differs) and `N/A` as numbers."""
    digits = field_.rstrip("+")
    return int(digits) if digits.isdigit() else 0


def parse_sinfo(text: str) -> list[Partition]:
    """Lines of `sinfo -h -o SINFO_FORMAT`; a partition with several kinds of node comes on several lines."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, avail, nodes, cpus, mem, gres = (line.split("|") + [""] * 5)[:6]
        key = name.rstrip("*")
        part = parts.setdefault(key, Partition(key, name.endswith("*"), avail))
        gpus, kind = parse_gres(gres)
        part.groups.append(NodeGroup(_count(nodes), _count(cpus), _count(mem), gpus, kind, gres))
    return list(parts.values())


def query(sinfo: str = "sinfo", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sinfo, "-h", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=timeout)


def partitions() -> list[Partition]:
    """The cluster's partitions; ValueError when sinfo does not answer."""
    try:
        out = query()
    except subprocess.TimeoutExpired:
        raise ValueError("sinfo timed out after 30 s: is the SLURM controller reachable?") from None
    if out.returncode != 0:
        raise ValueError(f"sinfo failed ({out.stderr.strip()}): is the SLURM controller reachable?")
    return parse_sinfo(out.stdout)


def choose_partition(found: list[Partition], name: str | None) -> Partition:
    """The partition called `name`, or the default one when None; ValueError naming what exists."""
    names = ", ".join(p.name for p in found) or "none"
    if name is None:
        defaults = [p for p in found if p.default]
        if not defaults:
            raise ValueError(f"this cluster has no default partition: set --partition (one of {names})")
        return defaults[0]
    for p in found:
        if p.name == name:
            return p
    raise ValueError(f"partition {name!r} does not exist; sinfo lists: {names}")
