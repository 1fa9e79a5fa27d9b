"""Bad input, handled one way for every adapter: an error naming the file and line (or record), or a skip
counted by reason where the config allows it, or — in `--check` mode — one entry in a list of every problem.

Text inputs are read with `read_text`, which never fails on bad bytes: they are kept as surrogate escapes,
so one non-UTF-8 record is reported (and can be skipped) without losing the rest of the file.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from medlava.io import InputError

log = logging.getLogger(__name__)

REASONS = {
    "missing_image": "an image file named by a sample is not there",
    "unreadable_image": "an image file is corrupt, truncated or not an image",
    "oversized_image": "an image is over the decompression-bomb pixel limit, or would be once padded to a square",
    "image_outside_root": "an image path leaves the image root (../ or an absolute path elsewhere)",
    "bad_record": "a malformed JSON line or a record without the fields the format needs",
    "unknown_label": "a label, answer type, view or language outside the known set",
    "duplicate_id": "a sample id seen before (the first is kept)",
    "empty_report": "a report (or answer) with no text",
    "missing_section": "a report without the section the samples are made from (e.g. FINDINGS)",
    "missing_report": "a report file named by the metadata is not there",
    "non_utf8": "text that is not valid UTF-8",
}
"""Every kind of per-sample problem; each one may be listed in data.skip to be skipped and counted."""

MAX_KEPT = 10_000  # problems listed one by one in prepare_report.json; beyond that only counted
MAX_SHOWN = 200  # ... and printed by --check


class Problems:
    """Collects per-sample problems. strict (default): the first one not in `skip` raises InputError;
    check: every problem is recorded and the sample dropped. Skipped ones are counted by reason either way."""

    def __init__(self, check: bool = False, skip: frozenset[str] | set[str] = frozenset()):
        unknown = set(skip) - set(REASONS)
        if unknown:
            raise ValueError(f"unknown skip reasons {sorted(unknown)}; known: {sorted(REASONS)}")
        self.check, self.skip = check, frozenset(skip)
        self.errors: list[dict[str, str]] = []
        self.error_counts: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()

    def add(self, reason: str, where: str, message: str) -> None:
        """One problem with a sample: raise, record or count it. The caller drops the sample after."""
        assert reason in REASONS, reason
        if reason in self.skip:
            self.skipped[reason] += 1
            if self.skipped[reason] <= 3:
                log.warning("skipping (%s): %s: %s", reason, where, message)
            return
        if not self.check:
            hint = f" (or add {reason} to data.skip to skip and count such samples)"
            raise InputError(f"{where}: {message}{hint}")
        self._record(reason, where, message)

    def fatal(self, error: InputError, reason: str = "structure") -> None:
        """A problem that stops reading one source (a missing file, wrong columns, a group in two splits):
        raised, or recorded in check mode so the other sources are still checked."""
        if not self.check:
            raise error
        self._record(reason, "", str(error))

    def _record(self, reason: str, where: str, message: str) -> None:
        self.error_counts[reason] += 1
        if len(self.errors) < MAX_KEPT:
            self.errors.append({"reason": reason, "where": where, "message": message})

    @property
    def ok(self) -> bool:
        return not self.error_counts

    def report(self) -> dict[str, Any]:
        return {
            "mode": "check" if self.check else "prepare",
            "ok": self.ok,
            "errors": self.errors,
            "error_counts": dict(sorted(self.error_counts.items())),
            "skipped": {r: self.skipped.get(r, 0) for r in REASONS},
            "skip_allowed": sorted(self.skip),
        }

    def render(self) -> str:
        """The check report as a person reads it: every listed problem, then the counts."""
        lines = [
            f"  {e['where'] + ': ' if e['where'] else ''}{e['message']} [{e['reason']}]"
            for e in self.errors[:MAX_SHOWN]
        ]
        shown = len(lines)
        total = sum(self.error_counts.values())
        if total > shown:
            lines.append(f"  ... and {total - shown} more (prepare_report.json lists {len(self.errors)})")
        counts = ", ".join(f"{r} {n}" for r, n in sorted(self.error_counts.items()))
        head = f"{total} problem(s): {counts}" if total else "no problems"
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()) if n)
        return "\n".join([head, *lines] + ([f"skipped (allowed by data.skip): {skipped}"] if skipped else []))


def _read_bytes(path: Path) -> bytes:
    path = Path(path)
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError on a cut file
        raise InputError(f"{path} cannot be read ({e})") from None


def read_text(path: Path) -> str:
    """A text file (gzip by suffix) as str, bad bytes kept as surrogate escapes (see `bad_bytes`);
    InputError when it is missing or unreadable."""
    return _read_bytes(path).decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def bad_bytes(text: str) -> str | None:
    """Where `text` holds bytes that were not UTF-8 (from `read_text`): 'line L, byte 0xNN', else None."""
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            line = text.count("\n", 0, i) + 1
            return f"line {line}, byte 0x{ord(ch) - 0xDC00:02x}"
    return None


def clean_strings(obj: Any) -> str | None:
    """bad_bytes over every string inside a parsed JSON value."""
    if isinstance(obj, str):
        return bad_bytes(obj)
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return next((b for b in map(clean_strings, obj) if b), None)
    return None


def read_json_records(path: Path, problems: Problems) -> list[tuple[str, dict]]:
    """(where, record) for each object of a JSON array file (`path record N`); InputError when the file
    cannot be parsed (a JSON syntax error names line and column)."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        where = f"{path} record {i}"
        if not isinstance(rec, dict):
            problems.add("bad_record", where, f"expected a JSON object, got {type(rec).__name__}")
            continue
        bad = clean_strings(rec)
        if bad:
            problems.add("non_utf8", where, f"text is not UTF-8 (file {bad})")
            continue
        out.append((where, rec))
    return out


def read_jsonl_records(path: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """(`path:line`, record) per non-empty line; a malformed or non-UTF-8 line is a problem of its own."""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if bad_bytes(line):
            problems.add("non_utf8", where, f"line is not UTF-8 ({bad_bytes(line).split(', ')[1]})")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.add("bad_record", where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(rec, dict):
            problems.add("bad_record", where, f"expected a JSON object, got {type(rec).__name__}")
            continue
        yield where, rec


def read_csv(path: Path, problems: Problems, columns: tuple[str, ...], multiline: bool = False) -> pd.DataFrame:
    """A CSV (gzip by suffix) as strings, empty fields NaN, checked for `columns`. The index names each row
    for messages: its line number, or (`multiline`: quoted fields may hold newlines) its row number.
    Rows holding non-UTF-8 bytes are problems of their own and dropped; InputError when unreadable."""
    raw = _read_bytes(path)
    try:
        # object, not pandas' arrow-backed str: arrow refuses the surrogate escapes of bad bytes
        df = pd.read_csv(
            io.BytesIO(raw),
            dtype=object,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            encoding="utf-8-sig",
            encoding_errors="surrogateescape",
        )
    except (ValueError, pd.errors.ParserError) as e:  # the parser's message names the line
        raise InputError(f"{path} cannot be read as CSV ({e}); expected columns {','.join(columns)}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}; expected {','.join(columns)} (found {list(df.columns)})")
    df.index = df.index + (2 if not multiline else 1)  # line 1 is the header; blank lines are kept as empty rows
    df = df.dropna(how="all")
    bad = df.apply(lambda col: col.str.contains("[\udc80-\udcff]", regex=True, na=False)).any(axis=1)
    for n in df.index[bad]:
        problems.add("non_utf8", row_where(path, n, multiline), "text is not UTF-8")
    return df[~bad]


def row_where(path: Path, n: int, multiline: bool = False) -> str:
    return f"{path} row {n}" if multiline else f"{path}:{n}"
