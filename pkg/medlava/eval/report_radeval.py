"""RadEval's report metrics over (id, reference, prediction) pairs as a chunked, resumable, exactly-once job:
the model-based metrics score each chunk's reports in batches into a resumable file (an array task each, or a
loop here), the merge reads every chunk, scores the cheap corpus metrics (BLEU, ROUGE) over all pairs and
writes RadEval's results, per-report scores and bootstrap intervals.

A pair with an empty reference or prediction is left out of these metrics and counted (`radeval_skipped`):
RaTEScore's sentence splitter drops an empty report and pairs every later report with its neighbour's, so no
metric gets one, and all of them are computed on the same pairs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlava.chunks import ChunkWriter, check_source, chunk_of, collect
from medlava.config import ConfigError, EvalConfig
from medlava.eval.bootstrap import percentile_ci, resample_counts
from medlava.eval.radeval_scorers import CORPUS, METRICS, NO_LLM, SCORERS, importable, load_scorers, use_cache
from medlava.eval.weights import MANIFEST, default_cache, verify_staged

log = logging.getLogger(__name__)


@dataclass
class Selection:
    metrics: list[str]
    """RadEval metric names to compute, in METRICS order."""
    cache: Path
    unavailable: dict[str, str] = field(default_factory=dict)
    """Default metrics left out, with why (not staged, not importable here)."""

    @property
    def per_report(self) -> list[str]:
        return [m for m in self.metrics if m not in CORPUS]


def metric_cache(cfg: EvalConfig) -> Path:
    return Path(cfg.metric_cache).expanduser() if cfg.metric_cache else default_cache()


def select_metrics(cfg: EvalConfig) -> Selection:
    """eval.report_metrics resolved: a list given is checked strictly (an unknown name, a metric that cannot run
    here or a missing or damaged weight is an error naming the fix); the default (every metric without an LLM)
    keeps the ones that can run and records why the others cannot."""
    cache = metric_cache(cfg)
    asked = cfg.report_metrics if cfg.report_metrics is not None else list(NO_LLM)
    unknown = sorted(set(asked) - set(METRICS))
    if unknown:
        raise ConfigError(
            f"eval.report_metrics: unknown {unknown}; RadEval's report metrics here are {', '.join(METRICS)}"
        )
    unavailable: dict[str, str] = {}
    for name in [m for m in METRICS if m in asked]:
        why = importable(name)
        problems = [] if why else [p.removeprefix(f"{name}: ") for p in verify_staged(cache, [name])]
        if why or problems:
            unavailable[name] = why or "; ".join(problems)
    if cfg.report_metrics is not None and unavailable:
        raise ConfigError("eval.report_metrics: cannot run " + "; ".join(f"{m}: {w}" for m, w in unavailable.items()))
    for name, why in unavailable.items():
        log.warning("report metrics: %s left out of the default set: %s", name, why)
    return Selection([m for m in METRICS if m in asked and m not in unavailable], cache, unavailable)


def scorable(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(the pairs RadEval scores, the ids left out because one side is empty)."""
    empty = (df["reference"].fillna("").str.strip() == "") | (df["prediction"].fillna("").str.strip() == "")
    return df[~empty].reset_index(drop=True), df.loc[empty, "id"].astype(str).tolist()


def chunk_file(folder: Path, idx: int, chunks: int) -> Path:
    return folder / f"scores-{idx:04d}-of-{chunks:04d}.jsonl"


def source_of(pairs: pd.DataFrame, selection: Selection) -> dict[str, Any]:
    """What decides the scores: the metrics, the weights' manifest, RadEval's version and the pairs."""
    manifest = selection.cache / MANIFEST
    digest = hashlib.sha256(
        pd.util.hash_pandas_object(pairs[["id", "reference", "prediction"]], index=False).to_numpy().tobytes()
    ).hexdigest()
    return {
        "eval.report_metrics": selection.per_report,
        "eval.metric_cache": str(selection.cache.absolute()),
        "weights": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None,
        "radeval": importlib.metadata.version("radeval"),
        "pairs": digest,
    }


def score_chunks(
    pairs: pd.DataFrame, selection: Selection, indices: list[int], chunks: int, folder: Path, batch_size: int
) -> None:
    """Score chunks `indices` of `chunks` with every per-report metric, `batch_size` reports at a time, each batch
    appended and flushed before the next: a killed task resumes after the last whole batch. The models load once,
    and only when some report is left to score."""
    todo = [i for i in indices if not chunk_file(folder, i, chunks).exists()]
    if not todo or not selection.per_report:
        return
    source = source_of(pairs, selection)
    check_source(folder, source, claim=True, noun="score")
    scorers = None
    for idx in todo:
        writer = ChunkWriter(chunk_file(folder, idx, chunks), source, key="id", noun="score")
        left = pairs[[chunk_of(i, chunks) == idx and str(i) not in writer.done_ids for i in pairs["id"]]]
        if len(left) and scorers is None:
            use_cache(selection.cache)
            scorers = load_scorers(selection.per_report, pairs["reference"].tolist())
        for start in range(0, len(left), batch_size):
            batch = left.iloc[start : start + batch_size]
            refs, hyps = batch["reference"].tolist(), batch["prediction"].tolist()
            scores = {name: s.score(refs, hyps) for name, s in scorers.items()}
            writer.write(
                [
                    {"id": str(i), "scores": {name: scores[name][k] for name in scores}}
                    for k, i in enumerate(batch["id"])
                ]
            )
            log.info(
                "report metrics: chunk %d/%d, %d of %d reports scored",
                idx,
                chunks,
                min(start + batch_size, len(left)),
                len(left),
            )
        writer.finish()


def merge_scores(
    pairs: pd.DataFrame, selection: Selection, chunks: int, folder: Path, n_bootstrap: int
) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metrics.json's RadEval part, per-report scores) from the finished chunks; every pair exactly once."""
    refs, hyps = pairs["reference"].tolist(), pairs["prediction"].tolist()
    per: dict[str, list[dict]] = {}
    if selection.per_report:
        source = source_of(pairs, selection)
        check_source(folder, source, noun="score")
        rows = collect(
            folder,
            [chunk_file(folder, i, chunks) for i in range(chunks)],
            "id",
            pairs["id"].astype(str).tolist(),
            "score chunk {0} again (--chunk-idx {0})",
            source,
            noun="score",
            verb="scored",
        )
        per = {name: [r["scores"][name] for r in rows] for name in selection.per_report}
    corpus = [m for m in selection.metrics if m in CORPUS]
    if corpus:
        per |= {name: s.score(refs, hyps) for name, s in load_scorers(corpus, refs).items()}
    result: dict[str, Any] = {}
    intervals: dict[str, list[float] | None] = {}
    table = pd.DataFrame({"id": pairs["id"].astype(str).to_numpy()})
    for name in selection.metrics:
        scorer = SCORERS[name]
        result |= scorer.result(per[name], refs, hyps)
        intervals |= bootstrap(scorer, per[name], refs, hyps, n_bootstrap)
        for col in scorer.columns:
            table[col] = [s[col] for s in per[name]]
    return {"radeval": result, "radeval_ci95": intervals}, table


def bootstrap(
    scorer, scores: list[dict], refs: list[str], hyps: list[str], n_bootstrap: int
) -> dict[str, list[float] | None]:
    """95% percentile intervals of the scorer's corpus results over `n_bootstrap` resamples of the pairs."""
    if not n_bootstrap or not scores:
        return {}
    draws: dict[str, list[np.ndarray]] = {}
    for w in resample_counts(len(scores), n_bootstrap):
        for key, values in scorer.resampled(scores, refs, hyps, w).items():
            draws.setdefault(key, []).append(values)
    return {key: percentile_ci(np.concatenate(parts)) for key, parts in draws.items()}
