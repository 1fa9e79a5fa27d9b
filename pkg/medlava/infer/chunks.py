"""Chunked, resumable answer files.

A sample's chunk is a hash of its id, so it is the same on every run whatever the order or number of
samples. A chunk is answered into `<name>.partial.jsonl` (appended and flushed per batch; a re-run skips
the ids already there and drops a torn last line) and renamed to `<name>.jsonl` when whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medlava.io import InputError


def chunk_of(sample_id: str, chunks: int) -> int:
    return int.from_bytes(hashlib.sha1(str(sample_id).encode()).digest()[:8], "big") % chunks


def chunk_path(folder: Path, idx: int, chunks: int) -> Path:
    return folder / f"answers-{idx:04d}-of-{chunks:04d}.jsonl"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name.replace(".jsonl", ".partial.jsonl"))


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


class ChunkWriter:
    def __init__(self, final: Path):
        self.final, self.partial = final, partial_path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.done_ids = {str(r["question_id"]) for r in read_partial(self.partial)}
        self._f = self.partial.open("a", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done_ids.update(str(r["question_id"]) for r in rows)

    def finish(self) -> None:
        self._f.close()
        os.replace(self.partial, self.final)


def merge_chunks(folder: Path, chunks: int, expected_ids: list[str]) -> list[dict]:
    """All chunk rows in `expected_ids` order; every sample must be answered exactly once."""
    missing_files = [str(chunk_path(folder, i, chunks)) for i in range(chunks)
                     if not chunk_path(folder, i, chunks).exists()]
    if missing_files:
        raise FileNotFoundError(f"{len(missing_files)} of {chunks} chunks are not finished: {missing_files[:5]}; "
                                "re-run those chunks (they resume) before merging")
    by_id: dict[str, dict] = {}
    dupes: list[str] = []
    for i in range(chunks):
        path = chunk_path(folder, i, chunks)
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                qid = str(row["question_id"])
                if qid in by_id:
                    dupes.append(qid)
                by_id[qid] = row
    expected = [str(i) for i in expected_ids]
    missing = [i for i in expected if i not in by_id]
    extra = sorted(set(by_id) - set(expected))
    if dupes or missing or extra:
        raise InputError(f"chunks in {folder} do not cover the split exactly once: {len(dupes)} answered twice "
                         f"{dupes[:5]}, {len(missing)} missing {missing[:5]}, {len(extra)} unknown {extra[:5]}")
    return [by_id[i] for i in expected]
