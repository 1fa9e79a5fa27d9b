"""Bootstrap resamples as row weights: resample b of n rows is the count of each row's draws, so a statistic of
the resample is a weighted statistic of all rows (one matrix product for b resamples at once)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MAX_CELLS = 4_000_000  # weights held at once (resamples x rows), ~32 MB of float64


def resample_counts(n: int, n_bootstrap: int, seed: int = 0) -> Iterator[np.ndarray]:
    """(b, n) float arrays of draw counts, b resamples at a time, `n_bootstrap` in all."""
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_CELLS // max(n, 1))
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        yield np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(float)


def mean_ci(values: np.ndarray, n_bootstrap: int, seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of the mean over `n_bootstrap` resamples of `values` (None without values or
    resamples), drawn MAX_CELLS at a time: the same interval as one draw of every resample at once."""
    if not n_bootstrap or len(values) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, MAX_CELLS // len(values))
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, len(values), size=(min(chunk, n_bootstrap - start), len(values)))
        means.append(values[idx].mean(axis=1))
    return [float(v) for v in np.percentile(np.concatenate(means), [2.5, 97.5])]


def percentile_ci(values: np.ndarray) -> list[float] | None:
    """The 2.5 and 97.5 percentiles of the defined (non-NaN) values; None when none is defined."""
    values = values[~np.isnan(values)]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values.size else None
