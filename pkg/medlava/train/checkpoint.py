"""One Checkpointer for every training loop: checkpoints/<name> written whole, listed, pruned and resumed.

Invariants:
- A directory named checkpoints/<prefix>-N[-step-S] exists only whole: every rank writes its part into one hidden
  temp directory, and it is renamed into place after a barrier (medlava.artifacts.publish).
- Every checkpoint holds STATE (the loop's position, optimizer, scheduler and what the loop adds, plus the world
  size it was saved under and whether its optimizer state is sharded), `rng-<rank>.pt` of each rank, and MANIFEST
  (what later stages load: the kind's weights and, for the VLM, the processor).
- After a save only the newest `keep_last` checkpoints remain, plus the ones the loop keeps (the best).
- A resume onto another number of processes is allowed where every rank holds the whole state (DDP: weights and
  optimizer are replicated; the loop re-splits the data position) and refused, naming why, where it is sharded
  (DeepSpeed ZeRO keeps one optimizer shard per rank).
- Every checkpoint's MANIFEST records the settings that decide its weights and their hash; a resume with others is
  refused, naming the keys that differ, before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlava.artifacts import Kind, publish, read_manifest, temp_dir_for, temp_path, write_manifest
from medlava.config import ConfigError, changed_settings
from medlava.distributed import Dist, barrier
from medlava.runs import is_complete

log = logging.getLogger(__name__)
STATE = "trainer_state.pt"


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Checkpointer:
    run: Path
    dist: Dist
    keep_last: int | None
    """The newest checkpoints kept after a save (None: all)."""
    prefix: str = "step"
    settings: dict | None = None
    """What decides the weights (train.runtime.weight_settings): each checkpoint records it, a resume must match it."""

    @property
    def root(self) -> Path:
        return self.run / "checkpoints"

    def saved(self) -> list[Path]:
        """The complete checkpoints, oldest first: `<prefix>-N` or `<prefix>-N-step-S` holding STATE; anything else
        there (a user's step-100.bak copy) is not ours."""
        found = (
            [
                p
                for p in self.root.glob(f"{self.prefix}-*")
                if (p / STATE).exists() and re.fullmatch(rf"{self.prefix}-\d+(-step-\d+)?", p.name)
            ]
            if self.root.exists()
            else []
        )
        return sorted(found, key=lambda p: tuple(int(x) for x in p.name.split("-")[1::2]))

    def save(
        self,
        name: str,
        kind: Kind,
        manifest: dict,
        state: dict,
        write: Callable[[Path], None],
        engine=None,
        keep: frozenset[str] = frozenset(),
    ) -> Path:
        """checkpoints/`name`, on every rank: `write(tmp)` puts the weights in (each rank calls it; what only rank 0
        writes, it writes on rank 0), `engine` (DeepSpeed) its sharded state; then the older ones go."""
        final = self.root / name
        tmp = temp_path(final)  # the same name on every rank: each writes its files into it
        if self.dist.main:
            temp_dir_for(final)
        barrier()
        torch.save(_rng_state(), tmp / f"rng-{self.dist.rank}.pt")
        if engine is not None:  # optimizer, scheduler and trainable weights, sharded as they are in memory
            engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        write(tmp)
        if self.dist.main:
            torch.save(state, tmp / STATE)
            write_manifest(
                tmp,
                kind,
                **manifest,
                world_size=self.dist.world_size,
                sharded=engine is not None,
                **self._settings_record(),
            )
        barrier()  # every rank's part is in tmp before it becomes `name`: renamed earlier, a slow rank's is lost
        if self.dist.main:  # a re-run of the same step after a crash between rename and COMPLETE replaces it
            publish(tmp, final, exists="replace")
            self.prune(keep | {name})
        barrier()
        return final

    def prune(self, keep: frozenset[str]) -> None:
        if self.keep_last is None:
            return
        for old in self.saved()[: -self.keep_last]:
            if old.name not in keep:
                shutil.rmtree(old)

    def _settings_record(self) -> dict:
        if self.settings is None:
            return {}
        text = json.dumps(self.settings, sort_keys=True)
        return {"settings": self.settings, "settings_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}

    def check_settings(self) -> None:
        """Refuse to resume the newest checkpoint when it was trained with other settings, naming the keys that
        differ. A stage calls it before runs.start_run, so a refused run's config.yaml stays what the checkpoints were
        trained with (a complete run start_run refuses itself)."""
        saved = self.saved()
        if not saved or is_complete(self.run):
            return
        recorded = read_manifest(saved[-1]).get("settings")
        if recorded is None:  # written before checkpoints recorded their settings
            log.warning("%s records no settings: resuming without checking them", saved[-1])
        elif changed := changed_settings(recorded, self.settings or {}):
            raise ConfigError(
                f"{saved[-1]} was trained with other settings ({'; '.join(changed)}); resuming it with "
                "these would mix two trainings in one set of weights: relaunch with its settings "
                f"({self.run / 'config.yaml'}), or leave run_id unset to train a new run"
            )

    def check_world(self) -> None:
        """Refuse, before anything is loaded, to resume a sharded checkpoint under another number of processes."""
        saved = self.saved()
        if not saved:
            return
        manifest = read_manifest(saved[-1])
        world, here = manifest.get("world_size"), self.dist.world_size
        if manifest.get("sharded") and world != here:
            raise ConfigError(
                f"{saved[-1]} holds DeepSpeed ZeRO state sharded over {world} process(es), one "
                f"optimizer shard per rank, and cannot be resumed by {here}: resume with {world} "
                "process(es) (cluster.nodes x GPUs per node), or start a new run_id"
            )

    def resume(self, seed: int) -> tuple[Path, dict] | None:
        """The newest checkpoint and its state, on every rank, with this rank's random state restored; None when
        there is none. Saved under another number of processes: refused when its state is sharded; otherwise each
        rank's random state is reseeded from `seed`, its rank and the step (the samples are the same; dropout's
        draws differ from an uninterrupted run's)."""
        self.check_world()
        saved = self.saved()
        if not saved:
            return None
        ckpt = saved[-1]
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
        world = read_manifest(ckpt).get("world_size")
        rng = ckpt / f"rng-{self.dist.rank}.pt"
        if world == self.dist.world_size and rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        else:
            log.warning(
                "%s was saved by %s process(es), resumed by %d: weights, optimizer and data position carry "
                "over; random draws (dropout) are reseeded",
                ckpt,
                world,
                self.dist.world_size,
            )
            reseed(seed + 1_000_003 * self.dist.rank + int(state["position"]["step"]))
        return ckpt, state


def check_resume(run: Path, dist: Dist, resume: str, settings: dict, prefix: str = "step") -> None:
    """Checkpointer.check_world and check_settings, for the run a training stage is about to start (resume=auto)."""
    if resume == "auto":
        checkpointer = Checkpointer(run, dist, None, prefix, settings)
        checkpointer.check_world()
        checkpointer.check_settings()
