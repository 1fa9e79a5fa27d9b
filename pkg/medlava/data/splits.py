"""Group-aware splits: no lesion (or patient) in two splits, stratified by label as far as groups allow."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from medlava.io import InputError


def grouped_split(df: pd.DataFrame, group_col: str, label_col: str, ratios: tuple[float, float, float],
                  seed: int) -> pd.Series:
    """'train' / 'val' / 'test' per row, from StratifiedGroupKFold folds sized by `ratios`."""
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"split ratios must be >= 0 and sum to 1, got {ratios}")
    # Each split takes whole folds: 20 folds give 5% resolution, but stratification needs every class in
    # every fold, so small datasets get as many folds as their rarest class has groups (at least 3).
    rarest = int(df.groupby(label_col)[group_col].nunique().min())
    n_folds = max(3, min(20, rarest, df[group_col].nunique()))
    folds = pd.Series(-1, index=df.index)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, idx) in enumerate(sgkf.split(df, df[label_col], df[group_col])):
        folds.iloc[idx] = k
    n_train = round(ratios[0] * n_folds)
    n_val = min(round(ratios[1] * n_folds), n_folds - n_train) if ratios[2] > 0 else n_folds - n_train
    split = pd.Series("test", index=df.index)
    split[folds < n_train] = "train"
    split[(folds >= n_train) & (folds < n_train + n_val)] = "val"
    return split


def check_no_group_leak(df: pd.DataFrame, group_col: str, split_col: str) -> None:
    per_group = df.groupby(group_col)[split_col].nunique()
    leaked = per_group[per_group > 1].index.tolist()
    if leaked:
        raise InputError(f"{len(leaked)} {group_col} values fall in more than one split: {leaked[:10]}")
