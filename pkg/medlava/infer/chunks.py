"""Infer's chunked answer files (the chunk machinery is medlava.chunks): the answer-file names and the merge,
which also refuses answers of more than one model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from medlava.chunks import (
    ChunkWriter,
    check_source,
    chunk_of,
    collect,
    partial_path,
    settings_path,
)
from medlava.io import InputError

__all__ = [
    "ChunkWriter",
    "check_source",
    "chunk_of",
    "chunk_path",
    "merge_chunks",
    "partial_path",
    "settings_path",
]


def chunk_path(folder: Path, idx: int, chunks: int) -> Path:
    return folder / f"answers-{idx:04d}-of-{chunks:04d}.jsonl"


def merge_chunks(folder: Path, chunks: int, expected_ids: list[str], source: dict) -> list[dict]:
    """All chunk rows in `expected_ids` order; every sample must be answered exactly once, every chunk with the
    settings `source`."""
    rows = collect(
        folder,
        [chunk_path(folder, i, chunks) for i in range(chunks)],
        "question_id",
        expected_ids,
        "run chunk {0} again (--chunk-idx {0})",
        source,
    )
    models = Counter(str(row.get("model_id")) for row in rows)
    if len(models) > 1:
        raise InputError(
            f"chunks in {folder} hold answers of {len(models)} models ("
            + ", ".join(f"{m}: {n} answers" for m, n in models.most_common())
            + "); a merged answer file must come from one model: answer again under a new run_id"
        )
    return rows
