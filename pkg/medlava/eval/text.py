"""Text-overlap metrics: BLEU from sacrebleu, ROUGE-L from rapidfuzz's LCS, token metrics for short answers.

Report conventions (R2Gen / CXR-Report-Metric, the numbers MIMIC-CXR papers print): lower case, "." kept as
its own token, other punctuation dropped. BLEU-n is corpus-level (n-gram counts summed over all pairs, one
brevity penalty, no smoothing), as pycocoevalcap computes it; ROUGE-L is the mean over pairs of the LCS
F-measure (`rouge_l`, beta 1 as rouge-score) and of pycocoevalcap's beta 1.2 variant (`rouge_l_coco`).
The longest common subsequence comes from rapidfuzz (C++, bit-parallel, ~1 us a pair): rouge-score's
pure-Python LCS table takes ~0.5 ms a pair, most of the 100,000-pair budget; tests check both agree.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from medlava.eval.normalize import tokens as answer_tokens

_REPORT_TOKEN = re.compile(r"\d+\.\d+|[a-z0-9]+|\.")
COCO_BETA = 1.2
MAX_ORDER = 4


def report_tokens(text: str | None) -> str:
    """A report as space-separated tokens (the form every report metric here reads)."""
    return " ".join(_REPORT_TOKEN.findall(str(text or "").lower()))


def _libraries():
    try:
        from rapidfuzz.distance import LCSseq
        from sacrebleu.metrics import BLEU
    except ImportError as e:
        raise metrics_extra_missing(e) from None
    return BLEU, LCSseq


def metrics_extra_missing(e: ImportError, who: str = "report metrics need") -> ImportError:
    """What to raise when a package of the `metrics` extra is missing: which one, and the line that installs it."""
    return ImportError(
        f"{who} the `metrics` extra ({e.name} is missing): pip install -c constraints.txt -e '.[metrics]'"
    )


def pair_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, np.ndarray]:
    """Per pair of tokenised texts: BLEU statistics (for corpus BLEU), sentence BLEU-4, ROUGE-L P/R/F."""
    BLEU, LCSseq = _libraries()
    bleu = BLEU(tokenize="none", max_ngram_order=MAX_ORDER, effective_order=True)
    n = len(hyps)
    stats = np.zeros((n, 2 + 2 * MAX_ORDER), dtype=np.int64)  # sys_len, ref_len, correct[1..4], total[1..4]
    sentence_bleu, rouge_p, rouge_r = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, (h, r) in enumerate(zip(hyps, refs)):
        s = bleu.sentence_score(h, [r])
        stats[i] = [s.sys_len, s.ref_len, *s.counts, *s.totals]
        sentence_bleu[i] = s.score / 100
        h_tokens, r_tokens = h.split(), r.split()
        lcs = LCSseq.similarity(h_tokens, r_tokens)  # token sequences: each word is one element
        if lcs:
            rouge_p[i], rouge_r[i] = lcs / len(h_tokens), lcs / len(r_tokens)
    rouge_f = f_beta(rouge_p, rouge_r, 1.0)
    return {
        "bleu_stats": stats,
        "sentence_bleu_4": sentence_bleu,
        "rouge_l_precision": rouge_p,
        "rouge_l_recall": rouge_r,
        "rouge_l": rouge_f,
        "rouge_l_coco": f_beta(rouge_p, rouge_r, COCO_BETA),
    }


def f_beta(p: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    ok = (p > 0) & (r > 0)
    out = np.zeros_like(p, dtype=float)
    out[ok] = (1 + beta**2) * p[ok] * r[ok] / (r[ok] + beta**2 * p[ok])
    return out


def corpus_bleu(stats: np.ndarray, order: int) -> float:
    """Corpus BLEU-`order` in [0, 1] from summed per-pair statistics (no smoothing)."""
    BLEU, _ = _libraries()
    total = stats.sum(axis=0)
    sys_len, ref_len = int(total[0]), int(total[1])
    correct = total[2 : 2 + MAX_ORDER][:order].tolist()
    totals = total[2 + MAX_ORDER :][:order].tolist()
    return BLEU.compute_bleu(correct, totals, sys_len, ref_len, smooth_method="none", max_ngram_order=order).score / 100


def exact_match(pred: str, ref: str) -> bool:
    return answer_tokens(pred) == answer_tokens(ref)


def token_recall(pred: str, ref: str) -> float:
    """LLaVA-Med's open-question metric: share of the reference's tokens found in the prediction."""
    ref_tokens = answer_tokens(ref)
    if not ref_tokens:
        return 0.0
    found = set(answer_tokens(pred))
    return sum(t in found for t in ref_tokens) / len(ref_tokens)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1: overlap of the two token multisets."""
    p, r = answer_tokens(pred), answer_tokens(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)
