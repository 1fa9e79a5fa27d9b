"""The field's report metrics, computed by RadEval (PyPI `radeval`, which wraps the reference implementations of
F1-CheXbert, F1-RadGraph, RadCliQ-v1, RaTEScore, GREEN and BERTScore), split into per-report scores (what the
chunks of a metric job compute) and RadEval's own results from them (what the merge writes).

For every metric, `result(scores)` returns exactly what `RadEval(metrics=[name], detailed=True)(refs, hyps)`
returns for the same pairs (tests hold it to that): the corpus numbers RadEval derives from per-report ones are
derived here the same way (F1-CheXbert's F1s are computed by RadEval's own code from the stored labels).
Two things are corpus-wide rather than per report and are handled as RadEval does over the whole set: BLEU
(corpus BLEU; scored at the merge, it is cheap) and RadCliQ-v1's BERTScore IDF weights (computed from all the
references in every chunk).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlava.eval.text import metrics_extra_missing
from medlava.io import InputError

log = logging.getLogger(__name__)

NO_LLM = ("bleu", "rouge", "bertscore", "f1chexbert", "radgraph", "radcliq", "ratescore")
"""The default metrics: every one that needs no LLM (GREEN runs a 7B generator; ask for it by name)."""
METRICS = (*NO_LLM, "green")
CORPUS = ("bleu", "rouge")
"""Scored once over all pairs at the merge (cheap); the others are scored per report in the chunks."""


class _RadEvalAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve `RadEval.x` as the module `radeval.x`: RadEval 2.2.1's vendored RadGraph imports itself as `RadEval`
    while the package installs as `radeval`, which fails on case-sensitive file systems (jbdel/RadEval#27)."""

    def find_spec(self, name, path=None, target=None):
        if name == "RadEval" or name.startswith("RadEval."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module("radeval" + spec.name[len("RadEval") :])
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system set the alias's spec on the shared module


def import_radeval():
    """`radeval`, importable offline: its __init__ downloads NLTK's punkt_tab (used only by SRR-BERT and a report
    cleaner none of these metrics call), which a compute node must not try."""
    if "radeval" in sys.modules:
        return sys.modules["radeval"]
    try:
        import nltk
    except ImportError as e:
        raise metrics_extra_missing(e) from None
    if not any(isinstance(f, _RadEvalAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, _RadEvalAlias())  # before PathFinder, which would load a second copy
    download, nltk.download = nltk.download, lambda *a, **k: True
    try:
        import radeval
    except ImportError as e:
        raise metrics_extra_missing(e, "the RadEval report metrics need") from None
    finally:
        nltk.download = download
    _fit_check_targets()
    return radeval


def _fit_check_targets() -> None:
    """RadEval's CheXbert evaluator unpacks scikit-learn's private `_check_targets` as (type, y_true, y_pred, ...);
    scikit-learn 1.9 returns (type, labels, y_true, y_pred, sample_weight), so RadEval would take the label list
    for y_true and fail. Give it the shape it was written for, holding the same arrays."""
    from radeval.metrics import _chexbert_base
    from sklearn.metrics._classification import _check_targets

    def check_targets(y_true, y_pred):
        out = _check_targets(y_true, y_pred)
        return (out[0], out[2], out[3], out[4]) if len(out) == 5 else out

    _chexbert_base._check_targets = check_targets


def use_cache(cache: Path, offline: bool = True) -> None:
    """Read every metric's weights from the staged cache `cache` (HF_HOME and XDG_CACHE_HOME), never from the
    network. Environment variables are read once at import by huggingface_hub and by RadEval's f1chexbert and
    RadGraph modules, so modules already imported are pointed at it too."""
    cache = Path(cache).absolute()
    env = {"HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub"), "XDG_CACHE_HOME": str(cache)}
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    os.environ.update(env)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        constants.HF_HOME, constants.HF_HUB_CACHE = env["HF_HOME"], env["HF_HUB_CACHE"]
        constants.HF_HUB_OFFLINE = offline or constants.HF_HUB_OFFLINE
    for module, value in (
        ("radeval.metrics.f1chexbert.f1chexbert", cache / "chexbert"),
        ("radeval.metrics.radgraph._vendor.core", cache / "radgraph" / "0.1.18"),
    ):
        if module in sys.modules:
            sys.modules[module].CACHE_DIR = str(value)


def adapter(name: str):
    """RadEval's metric object for `name`, built with RadEval's own settings (models, layers, baselines)."""
    import_radeval()
    from radeval.metrics._registry import get_metric_class

    try:
        cls = get_metric_class(name)
    except (ImportError, ValueError) as e:  # medspacy under numpy 2 raises ValueError at import
        raise ImportError(f"RadEval's {name} cannot be imported here: {e}{_IMPORT_HINTS.get(name, '')}") from None
    if name != "f1chexbert":
        return cls()
    import torch
    from radeval.metrics.f1chexbert.f1chexbert import F1CheXbert

    # RadEval's adapter builds F1CheXbert(device="cuda"), whose labeler moves to CUDA before the CPU fallback
    # is checked: without a GPU it fails. Same class, same settings, the device chosen here.
    metric = cls.__new__(cls)
    metric._scorer = F1CheXbert(device="cuda" if torch.cuda.is_available() else "cpu")
    return metric


_IMPORT_HINTS = {
    "ratescore": (
        ". RaTEScore splits sentences with medspacy; on Python < 3.12 medspacy 1.3 requires spacy < 3.8, "
        "whose thinc 8.2 is built for numpy < 2 while medlava pins numpy 2: run it with Python >= 3.12 "
        "(medspacy then takes spacy 3.8), or leave ratescore out of eval.report_metrics"
    ),
}


def importable(name: str) -> str | None:
    """Why `name` cannot run in this environment (None when it can), without loading any weights."""
    try:
        import_radeval()
        from radeval.metrics._registry import METRIC_REGISTRY

        importlib.import_module(METRIC_REGISTRY[name][0])
    except (ImportError, ValueError) as e:
        return f"{e}{_IMPORT_HINTS.get(name, '')}"
    return None


# ------------------------------------------------------------------------------------------ per-report scorers


def _format(raw: dict) -> dict[str, Any]:
    """RadEval's detailed-mode output of a simple metric (its MetricBase formatting: aggregates rounded)."""
    import_radeval()
    from radeval.metrics._base import MetricBase

    return MetricBase._format_output(None, raw, per_sample=False, detailed=True)


def _weighted_mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (w @ values) / w.sum(axis=1)


class Scorer:
    """One metric. `score` (a loaded model) gives per-report values, dicts of column -> value; `result` gives
    RadEval's results from them and `resampled` the same corpus values under bootstrap row weights (b, n), so
    neither needs the model."""

    columns: tuple[str, ...]
    """Per-report columns of per_sample.csv; the first is the one reports are ranked by."""

    def __init__(self, name: str, corpus_refs: Sequence[str]):
        self.name, self.metric = name, adapter(name)

    def score(self, refs: list[str], hyps: list[str]) -> list[dict[str, Any]]:
        raise NotImplementedError

    @staticmethod
    def result(scores: list[dict], refs: list[str], hyps: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def resampled(cls, scores: list[dict], refs: list[str], hyps: list[str], w: np.ndarray) -> dict[str, np.ndarray]:
        """Each mean-of-reports result under the weights (the default: every column named like a result key)."""
        keys = [k for k in cls.result(scores, refs, hyps) if k in cls.columns]
        return {k: _weighted_mean(np.array([s[k] for s in scores], dtype=float), w) for k in keys}


class Bleu(Scorer):
    """Corpus BLEU-1..4 as RadEval computes it (pycocoevalcap's BleuScorer: whitespace tokens, closest reference
    length, tiny smoothing constants); per report, sentence BLEU-4."""

    columns = ("bleu",)

    def score(self, refs, hyps):
        return [{"bleu": float(s)} for s in self.metric._scorer(refs, hyps)[1]]

    @staticmethod
    def result(scores, refs, hyps):
        return adapter("bleu").compute(refs, hyps, detailed=True)

    @classmethod
    def resampled(cls, scores, refs, hyps, w):
        from radeval.metrics.bleu.bleu_scorer import cook_refs, cook_test

        stats = []  # per pair: test length, closest reference length, guesses 1..4, matches 1..4
        for h, r in zip(hyps, refs):
            cooked = cook_test(h, cook_refs([r]))
            stats.append(
                [
                    cooked["testlen"],
                    min((abs(x - cooked["testlen"]), x) for x in cooked["reflen"])[1],
                    *cooked["guess"],
                    *cooked["correct"],
                ]
            )
        total = w @ np.array(stats, dtype=float)
        tiny, small = 1e-15, 1e-9  # BleuScorer's constants
        ratio = (total[:, 0] + tiny) / (total[:, 1] + small)
        brevity = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
        out, product = {}, np.ones(len(w))
        for k in range(4):
            product = product * (total[:, 6 + k] + tiny) / (total[:, 2 + k] + small)
            out["bleu" if k == 3 else f"bleu_{k + 1}"] = product ** (1 / (k + 1)) * brevity
        return out


class Rouge(Scorer):
    columns = ("rougeL", "rouge1", "rouge2")

    def score(self, refs, hyps):
        raw = self.metric._compute_raw(refs, hyps)
        return [{c: float(raw[c]["per_sample"][i]) for c in self.columns} for i in range(len(refs))]

    @staticmethod
    def result(scores, refs, hyps):
        return _format(
            {
                c: {"aggregate": sum(s[c] for s in scores) / len(scores), "per_sample": []}
                for c in ("rouge1", "rouge2", "rougeL")
            }
        )


class BertScore(Scorer):
    columns = ("bertscore",)

    def score(self, refs, hyps):
        return [{"bertscore": float(f)} for f in self.metric._scorer(refs, hyps)[1]]

    @staticmethod
    def result(scores, refs, hyps):
        import torch

        f = torch.tensor([s["bertscore"] for s in scores], dtype=torch.float32)  # RadEval averages float32 F1s
        return _format({"bertscore": {"aggregate": torch.mean(f).item(), "per_sample": []}})


class F1CheXbert(Scorer):
    """Per report: the 14 CheXbert labels of both texts (rrg mode: uncertain counts as positive, as RadEval);
    the corpus F1s come from RadEval's own evaluator fed with those labels."""

    columns = ("f1chexbert_sample_acc_all", "f1chexbert_sample_acc_5")
    RESULTS = (
        "f1chexbert_5_micro_f1",
        "f1chexbert_all_micro_f1",
        "f1chexbert_5_macro_f1",
        "f1chexbert_all_macro_f1",
        "f1chexbert_5_weighted_f1",
        "f1chexbert_all_weighted_f1",
    )

    def score(self, refs, hyps):
        labeler = self.metric._scorer
        ref_labels, hyp_labels = labeler.get_labels(refs), labeler.get_labels(hyps)
        out = self.from_labels(ref_labels, hyp_labels, per_sample=True)
        return [
            {"ref_labels": r, "hyp_labels": h, **{c: float(out[c][i]) for c in self.columns}}
            for i, (r, h) in enumerate(zip(ref_labels, hyp_labels))
        ]

    @classmethod
    def result(cls, scores, refs, hyps):
        return cls.from_labels([s["ref_labels"] for s in scores], [s["hyp_labels"] for s in scores])

    @staticmethod
    def from_labels(ref_labels, hyp_labels, per_sample: bool = False) -> dict:
        import_radeval()
        from radeval.metrics._chexbert_base import BaseCheXbertEvaluator
        from radeval.metrics.f1chexbert.adapter import F1CheXbertMetric
        from radeval.metrics.f1chexbert.f1chexbert import F1CheXbert as Labeler
        from scipy.sparse import SparseEfficiencyWarning
        from sklearn.exceptions import UndefinedMetricWarning

        class StoredLabels(BaseCheXbertEvaluator):  # RadEval's evaluator, its labeler replaced by the labels
            CONDITION_NAMES, NO_FINDING, TOP5 = Labeler.CONDITION_NAMES, Labeler.NO_FINDING, Labeler.TOP5

            def __init__(self):
                super().__init__()
                self._init_evaluator(model=None, tokenizer=None, device="cpu", batch_size=1)

            def get_labels(self, reports, mode="rrg", on_batch_done=None):
                return [list(r) for r in reports]

        metric = F1CheXbertMetric.__new__(F1CheXbertMetric)
        metric._scorer = StoredLabels()
        with warnings.catch_warnings():  # an F1 undefined for lack of a label is 0 by convention; sparse `==`
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            warnings.simplefilter("ignore", SparseEfficiencyWarning)
            return metric.compute(ref_labels, hyp_labels, per_sample=per_sample, detailed=not per_sample)

    @classmethod
    def resampled(cls, scores, refs, hyps, w):
        """Micro, macro and support-weighted F1 over the 14 labels and the 5, as scikit-learn's
        classification_report computes them (an undefined F1 counts 0), for each row of weights."""
        from radeval.metrics.f1chexbert.f1chexbert import F1CheXbert as Labeler

        truth = np.array([s["ref_labels"] for s in scores], dtype=float)
        pred = np.array([s["hyp_labels"] for s in scores], dtype=float)
        names = Labeler.CONDITION_NAMES + [Labeler.NO_FINDING]
        out = {}
        for tag, cols in (("all", list(range(len(names)))), ("5", [names.index(n) for n in Labeler.TOP5])):
            t, p = truth[:, cols], pred[:, cols]
            tp, fp, fn = w @ (t * p), w @ ((1 - t) * p), w @ (t * (1 - p))
            f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
            support = tp + fn
            micro = 2 * tp.sum(1)
            out[f"f1chexbert_{tag}_micro_f1"] = np.divide(
                micro, micro + fp.sum(1) + fn.sum(1), out=np.zeros(len(w)), where=micro + fp.sum(1) + fn.sum(1) > 0
            )
            out[f"f1chexbert_{tag}_macro_f1"] = f1.mean(axis=1)
            out[f"f1chexbert_{tag}_weighted_f1"] = np.divide(
                (f1 * support).sum(1), support.sum(1), out=np.zeros(len(w)), where=support.sum(1) > 0
            )
        return out


class RadGraph(Scorer):
    columns = ("radgraph_partial", "radgraph_simple", "radgraph_complete")

    def score(self, refs, hyps):
        levels = self.metric._scorer(refs=refs, hyps=hyps)[1]
        return [
            {"radgraph_simple": float(s), "radgraph_partial": float(p), "radgraph_complete": float(c)}
            for s, p, c in zip(*levels)
        ]

    @staticmethod
    def result(scores, refs, hyps):  # RadEval's detailed mode: np.mean of each level, not rounded
        return {
            k: float(np.mean([s[k] for s in scores]))
            for k in ("radgraph_simple", "radgraph_partial", "radgraph_complete")
        }


class RadCliQ(Scorer):
    """Per report: RadCliQ-v1 (lower is better); RadEval's result is 1 / its mean. Its BERTScore weighs tokens by
    IDF over the references RadEval is given, so every chunk computes it over all the references."""

    columns = ("radcliq_v1",)

    def __init__(self, name, corpus_refs):
        super().__init__(name, corpus_refs)
        composite = self.metric._scorer
        scorer = composite._get_bert_scorer(list(corpus_refs))
        composite._get_bert_scorer = lambda refs: scorer  # the IDF of all references, for every batch

    def score(self, refs, hyps):
        return [{"radcliq_v1": float(v)} for v in self.metric._scorer.predict(refs, hyps)[1]]

    @staticmethod
    def result(scores, refs, hyps):
        per_report = np.array([s["radcliq_v1"] for s in scores])
        return _format({"radcliq_v1": {"aggregate": 1 / per_report.mean(), "per_sample": []}})

    @classmethod
    def resampled(cls, scores, refs, hyps, w):
        return {"radcliq_v1": 1 / _weighted_mean(np.array([s["radcliq_v1"] for s in scores]), w)}


class RaTEScore(Scorer):
    columns = ("ratescore",)

    def score(self, refs, hyps):
        values = self.metric._scorer.compute_score(candidate_list=hyps, reference_list=refs)[0]
        return [{"ratescore": float(v)} for v in values]

    @staticmethod
    def result(scores, refs, hyps):
        values = [s["ratescore"] for s in scores]
        return _format({"ratescore": {"aggregate": sum(values) / len(values), "per_sample": []}})


class Green(Scorer):
    """Per report: the GREEN score and the generator's analysis it was parsed from."""

    columns = ("green", "green_analysis")

    def score(self, refs, hyps):
        _, _, values, frame = self.metric._scorer(refs, hyps)
        return [{"green": float(v), "green_analysis": str(a)} for v, a in zip(values, frame["green_analysis"])]

    @staticmethod
    def result(scores, refs, hyps):
        values = [s["green"] for s in scores]
        return _format(
            {
                "green": {
                    "aggregate": float(np.mean(values)),
                    "per_sample": [],
                    "detailed": {"green_std": float(np.std(values))},
                }
            }
        )


SCORERS: dict[str, type[Scorer]] = {
    "bleu": Bleu,
    "rouge": Rouge,
    "bertscore": BertScore,
    "f1chexbert": F1CheXbert,
    "radgraph": RadGraph,
    "radcliq": RadCliQ,
    "ratescore": RaTEScore,
    "green": Green,
}


def load_scorers(names: Sequence[str], corpus_refs: Sequence[str]) -> dict[str, Scorer]:
    out = {}
    for name in names:
        try:
            out[name] = SCORERS[name](name, corpus_refs)
        except OSError as e:  # transformers / huggingface_hub: a file not in the cache (HF_HUB_OFFLINE)
            raise InputError(
                f"{name}: its weights could not be loaded from the staged cache ({e}); stage them "
                f"with `medlava weights fetch --metrics {name} --cache DIR` where there is internet"
            ) from None
        log.info("report metrics: %s loaded", name)
    return out
