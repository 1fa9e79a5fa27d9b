"""Group-aware splits: no lesion (or patient) in two splits, stratified by label as far as groups allow;
and user-given split files, checked the same way."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from medlava.io import InputError

SPLITS = ("train", "val", "test")


def _check_ratios(ratios: tuple[float, float, float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=float)
    if r.shape != (3,) or not (r >= 0).all() or not abs(r.sum() - 1) <= 1e-6:  # `not <=` also catches NaN
        raise ValueError(f"split ratios must be three numbers >= 0 that sum to 1 (train, val, test), got {ratios}")
    return r


def _allocate(n: int, ratios: np.ndarray) -> np.ndarray:
    """How many of a class's `n` groups each split gets: rounded cumulative shares, then every split with a
    nonzero ratio gets at least one group when there are enough, so every class can be evaluated."""
    cuts = np.round(np.cumsum(ratios)[:-1] * n).astype(int)
    counts = np.diff(np.concatenate([[0], cuts, [n]]))
    wanted = ratios > 0
    if n >= wanted.sum():
        for i in np.flatnonzero(wanted & (counts == 0)):
            counts[counts.argmax()] -= 1  # some split holds >= 2 here (pigeonhole), so none drops to 0
            counts[i] += 1
    return counts


def grouped_split(
    df: pd.DataFrame, group_col: str, label_col: str, ratios: tuple[float, float, float], seed: int
) -> pd.Series:
    """'train' / 'val' / 'test' per row of `df` (same index): whole groups go to one split, and each label's
    groups are shared out by `ratios`. Deterministic for a seed, whatever the row order.

    Written by hand because sklearn's splitters do not fit: StratifiedGroupKFold only cuts equal folds
    (5% steps at best, and rare classes land in whichever fold), StratifiedShuffleSplit ignores groups
    and fails on a class with fewer than two members.
    """
    r = _check_ratios(ratios)
    for col in (group_col, label_col):
        if df[col].isna().any():
            raise ValueError(f"{int(df[col].isna().sum())} rows have no {col}; every row needs one to be split")
    # A group with mixed labels (a patient with several lesions) is stratified by its most common label.
    group_label = pd.crosstab(df[group_col], df[label_col]).idxmax(axis=1)
    rng = np.random.default_rng(seed)
    assigned = {}
    for label in sorted(group_label.unique()):
        groups = rng.permutation(group_label.index[group_label == label].to_numpy())
        counts = _allocate(len(groups), r)
        for split, part in zip(SPLITS, np.split(groups, np.cumsum(counts)[:-1])):
            assigned.update(dict.fromkeys(part, split))
    return df[group_col].map(assigned).rename("split")


def check_no_group_leak(df: pd.DataFrame, group_col: str, split_col: str) -> None:
    """Raise InputError listing every group whose rows fall in more than one split."""
    splits = df.groupby(group_col)[split_col].unique()
    leaked = splits[splits.map(len) > 1]
    if len(leaked):
        shown = ", ".join(f"{g} ({'/'.join(sorted(s))})" for g, s in leaked.head(10).items())
        raise InputError(
            f"{len(leaked)} {group_col} values fall in more than one split: {shown}"
            f"{' ...' if len(leaked) > 10 else ''}; put all rows of a {group_col} in one split"
        )


def read_split_file(path: Path, id_col: str = "image_id", ids: Iterable[str] | None = None) -> pd.Series:
    """A user's split CSV (`<id_col>,split`) as a Series id -> split. Every id must have exactly one split
    of train/val/test; when `ids` is given, each of them must be in the file (extra rows are allowed)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (OSError, ValueError) as e:  # pandas' parser and decoding errors are ValueErrors
        raise InputError(f"split file {path} cannot be read as CSV ({e}); expected columns {id_col},split") from None
    if id_col not in df.columns or "split" not in df.columns:
        raise InputError(f"split file {path} has columns {list(df.columns)}; expected {id_col},split")
    df.index = df.index + 2  # index = line number: line 1 is the header, blank lines were kept as empty rows
    df = df[(df[id_col] != "") | (df["split"] != "")]
    bad = df[(df[id_col] == "") | ~df["split"].isin(SPLITS)]
    if len(bad):
        line, row = next(bad.iterrows())
        raise InputError(
            f"{path}:{line}: {id_col}={row[id_col]!r} split={row['split']!r}; every row "
            f"needs an {id_col} and a split of {'/'.join(SPLITS)} ({len(bad)} such rows)"
        )
    dupes = df[df[id_col].duplicated(keep=False)]
    if len(dupes):
        first = dupes[id_col].iloc[0]
        lines = dupes.index[dupes[id_col] == first].tolist()
        raise InputError(
            f"{path}: {id_col} {first!r} is listed on lines {lines} ({dupes[id_col].nunique()} ids "
            "listed more than once); give each id exactly one row"
        )
    splits = df.set_index(id_col)["split"]
    if ids is not None:
        absent = [i for i in ids if i not in splits.index]
        if absent:
            raise InputError(
                f"split file {path} gives no split for {len(absent)} images, e.g. {absent[:5]}; add a row for each"
            )
    return splits
