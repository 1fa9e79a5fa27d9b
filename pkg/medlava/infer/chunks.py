"""Chunked, resumable answer files.

A sample's chunk is a hash of its id, so it is the same on every run whatever the order or number of
samples. A chunk is answered into `<name>.partial.jsonl` (appended and flushed per batch; a re-run skips
the ids already there and drops a torn last line) and renamed to `<name>.jsonl` when whole.

`source.json` beside them records what the answers were made with (the resolved checkpoint, model, inputs
and answering settings); a task or merge with other settings is refused, so one answer file never mixes two.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from medlava.config import ConfigError
from medlava.io import InputError

SOURCE = "source.json"


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


def check_source(folder: Path, source: dict, claim: bool = False) -> None:
    """Refuse when the chunks in `folder` were answered with settings other than `source` (flat, dotted config
    keys); with `claim`, record `source` first if nothing is recorded (the first of the array's tasks wins)."""
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
    changed = [f"{k}: {recorded.get(k)!r} then, {source.get(k)!r} now" for k in sorted(set(recorded) | set(source))
               if recorded.get(k) != source.get(k)]
    if changed:
        raise ConfigError(f"the answers in {folder} were made with other settings ({'; '.join(changed)}); one "
                          f"answer file must come from one model and one setting: use a new run_id, or delete "
                          f"{folder} to answer everything again")


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
    bar = tqdm(total=len(expected_ids), desc="merge", unit="answer", mininterval=5, disable=len(expected_ids) < 1000)
    for i in range(chunks):
        path = chunk_path(folder, i, chunks)
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                bar.update()
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not a JSON answer row ({e.msg}): the chunk file is damaged; "
                                     f"delete it and run chunk {i} again (--chunk-idx {i}), then merge") from None
                qid = str(row["question_id"])
                if qid in by_id:
                    dupes.append(qid)
                by_id[qid] = row
    bar.close()
    expected = [str(i) for i in expected_ids]
    missing = [i for i in expected if i not in by_id]
    extra = sorted(set(by_id) - set(expected))
    if dupes or missing or extra:
        raise InputError(f"chunks in {folder} do not cover the split exactly once: {len(dupes)} answered twice "
                         f"{dupes[:5]}, {len(missing)} missing {missing[:5]}, {len(extra)} unknown {extra[:5]}")
    models = Counter(str(row.get("model_id")) for row in by_id.values())
    if len(models) > 1:
        raise InputError(f"chunks in {folder} hold answers of {len(models)} models ("
                         + ", ".join(f"{m}: {n} answers" for m, n in models.most_common())
                         + "); a merged answer file must come from one model: answer again under a new run_id")
    return [by_id[i] for i in expected]
