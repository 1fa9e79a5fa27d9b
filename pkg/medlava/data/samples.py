"""Read prepared sample JSONL (the contract between `prepare` and every later stage)."""

from __future__ import annotations

import json
from pathlib import Path

from medlava.io import InputError, read_jsonl


def validate_sample(row: dict, where: str) -> dict:
    if "id" not in row or "conversations" not in row:
        raise InputError(f"{where}: a sample needs `id` and `conversations` (LLaVA format); got keys {sorted(row)}")
    convs = row["conversations"]
    if not isinstance(convs, list) or not convs or not all(isinstance(c, dict) and "value" in c for c in convs):
        raise InputError(f"{where} (id {row['id']}): `conversations` must be a list of {{from, value}} turns")
    meta = row.get("meta") or {}
    choices = meta.get("choices")
    if choices is not None and (
        not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        # A closed question without choices is allowed (SLAKE's non-evident ones): infer generates its answer.
        raise InputError(f"{where} (id {row['id']}): meta.choices must be a list of at least two non-empty strings")
    if meta.get("task") == "multiple_choice":
        options = meta.get("options")
        if (
            not choices
            or not isinstance(options, dict)
            or list(options) != choices
            or meta.get("answer") not in choices
        ):
            raise InputError(
                f"{where} (id {row['id']}): a multiple_choice sample needs meta.choices (the option "
                "letters), meta.options {letter: text} in the same order, and meta.answer one of them"
            )
    return row


def read_samples(path: Path) -> list[dict]:
    samples = []
    seen: set[str] = set()
    for i, row in enumerate(read_jsonl(path), 1):
        validate_sample(row, f"{path}:{i}")
        if str(row["id"]) in seen:
            raise InputError(f"{path}:{i}: duplicate sample id {row['id']!r}; ids must be unique")
        seen.add(str(row["id"]))
        samples.append(row)
    return samples


def split_file(prepared: Path, split: str) -> Path:
    """The JSONL of `split` in a prepare run directory; FileNotFoundError saying what is missing."""
    if not (prepared / "dataset.json").exists():
        raise FileNotFoundError(f"{prepared} holds no dataset.json: is it a `prepare` run directory?")
    path = prepared / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the prepare run has no `{split}` split")
    return path


def load_prepared(prepared: Path, split: str) -> tuple[list[dict], dict]:
    """(samples of `split`, dataset manifest) from a prepare run directory."""
    path = split_file(prepared, split)
    return read_samples(path), json.loads((prepared / "dataset.json").read_text())
