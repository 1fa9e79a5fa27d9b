"""Chunked, resumable result files, shared by the jobs that split work over array tasks (infer's answers, the
report-metric scores).

An item's chunk is a hash of its id, so it is the same on every run whatever the order or number of items. A
chunk is written into `<name>.partial.jsonl` (appended and flushed per batch; a re-run skips the ids already
there and drops a torn last line) and renamed to `<name>.jsonl` when whole; the merge reads every chunk and
requires every id exactly once.

`source.json` beside them records what the results were made with; a task or merge with other settings is
refused, so one result file never mixes two. Each chunk records them too (`<name>.settings.json`, written before its
first row), and the merge compares every chunk's with its own: a chunk that came from elsewhere, or was made after
source.json was removed, is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from medlava.config import ConfigError, changed_settings
from medlava.io import InputError, atomic_write_json

SOURCE = "source.json"


def chunk_of(item_id: str, chunks: int) -> int:
    return int.from_bytes(hashlib.sha1(str(item_id).encode()).digest()[:8], "big") % chunks


def partial_path(final: Path) -> Path:
    return final.with_name(final.name.replace(".jsonl", ".partial.jsonl"))


def settings_path(final: Path) -> Path:
    return final.with_name(final.name.replace(".jsonl", ".settings.json"))


def check_chunk(final: Path, source: dict, noun: str = "answer") -> None:
    """Refuse a chunk made with settings other than `source`, or with none recorded."""
    path = settings_path(final)
    if not path.exists():
        raise InputError(
            f"{final} has no record of the settings it was made with ({path.name}): it was not made "
            f"by this run; delete it and make that chunk again, or use a new run_id"
        )
    if changed := changed_settings(json.loads(path.read_text()), source):
        raise ConfigError(
            f"{final} was made with other settings ({'; '.join(changed)}); one {noun} file must come "
            "from one model and one setting: delete that chunk and make it again, or use a new run_id"
        )


def read_partial(path: Path) -> list[dict]:
    """Rows already answered; a torn last line (the job was killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    return rows


def check_source(folder: Path, source: dict, claim: bool = False, noun: str = "answer") -> None:
    """Refuse when the chunks in `folder` were made with settings other than `source` (flat, dotted config keys);
    with `claim`, record `source` first if nothing is recorded (the first of the array's tasks wins)."""
    path = folder / SOURCE
    if claim and not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SOURCE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.link(tmp, path)  # atomic and exclusive: a task that lost the race compares with the winner's
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    changed = changed_settings(recorded, source)
    if changed:
        raise ConfigError(
            f"the {noun}s in {folder} were made with other settings ({'; '.join(changed)}); one "
            f"{noun} file must come from one model and one setting: use a new run_id, or delete "
            f"{folder} to make everything again"
        )


class ChunkWriter:
    """Appends rows to a chunk's partial file (fsynced per batch) and renames it whole; `done_ids` are the ids
    (row[key]) a killed run had already written. The chunk records `source` first; a partial one continues only
    with its own."""

    def __init__(self, final: Path, source: dict, key: str = "question_id", noun: str = "answer"):
        self.final, self.partial, self.key = final, partial_path(final), key
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if settings_path(final).exists() or self.partial.exists():
            check_chunk(final, source, noun)
        else:
            atomic_write_json(settings_path(final), source)
        self.done_ids = {str(r[key]) for r in read_partial(self.partial)}
        self._f = self.partial.open("a", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done_ids.update(str(r[self.key]) for r in rows)

    def finish(self) -> None:
        self._f.close()
        os.replace(self.partial, self.final)


def collect(
    folder: Path,
    paths: Sequence[Path],
    key: str,
    expected_ids: Sequence[str],
    rerun: str,
    source: dict,
    noun: str = "answer",
    verb: str = "answered",
) -> list[dict]:
    """The rows of the finished chunk files `paths` in `expected_ids` order; every id exactly once, every chunk made
    with `source`. `rerun` says how to redo a chunk (formatted with its index)."""
    missing_files = [str(p) for p in paths if not p.exists()]
    if missing_files:
        raise FileNotFoundError(
            f"{len(missing_files)} of {len(paths)} chunks are not finished: {missing_files[:5]}; "
            "re-run those chunks (they resume) before merging"
        )
    for path in paths:
        check_chunk(path, source, noun)
    by_id: dict[str, dict] = {}
    dupes: list[str] = []
    bar = tqdm(total=len(expected_ids), desc="merge", unit=noun, mininterval=5, disable=len(expected_ids) < 1000)
    for i, path in enumerate(paths):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                bar.update()
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(
                        f"{path}:{n}: not a JSON {noun} row ({e.msg}): the chunk file is damaged; "
                        f"delete it and {rerun.format(i)}, then merge"
                    ) from None
                item = str(row[key])
                if item in by_id:
                    dupes.append(item)
                by_id[item] = row
    bar.close()
    expected = [str(i) for i in expected_ids]
    missing = [i for i in expected if i not in by_id]
    extra = sorted(set(by_id) - set(expected))
    if dupes or missing or extra:
        raise InputError(
            f"chunks in {folder} do not cover the split exactly once: {len(dupes)} {verb} twice "
            f"{dupes[:5]}, {len(missing)} missing {missing[:5]}, {len(extra)} unknown {extra[:5]}"
        )
    return [by_id[i] for i in expected]
