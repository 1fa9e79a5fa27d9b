"""VQA metrics, SLAKE / VQA-RAD style: CLOSED questions by accuracy after candidate routing, OPEN
questions by exact match, token recall, token F1 and BLEU, multiple-choice questions by letter accuracy; split by
answer_type, content_type, modality (and the other benchmarks' categories); the worst samples dumped with their
prompts. Beside them, the `llava_med_*` family reproduces LLaVA-Med v1.0's own scorer exactly (eval/llava_med_vqa.py)
and `mmmu_accuracy` MMMU's (eval/multiple_choice.py): the numbers to compare with published tables.

Closed routing (the first that applies; the route is recorded per sample and counted):
- `yes_no`: the reference is yes/no -> the answer's yes/no word (normalize.yes_no);
- `options`: the question offers the reference as one of "X or Y" -> the option the answer names;
- `vocab`: a closed-answer vocabulary (from the train split) plus the reference -> the candidate named;
- `exact`: no vocabulary -> the normalised answer itself.
An answer that names no candidate is unparsed: wrong, and counted (`closed_unparsed`), never guessed.
`closed_substring_accuracy` (the reference a substring of the answer, so "no" is found in "normal") shows what
a lenient score makes of the same answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlava.eval import llava_med_vqa
from medlava.eval.bootstrap import mean_ci
from medlava.eval.multiple_choice import mmmu_correct
from medlava.eval.normalize import ChoiceMatcher, normalize_text, yes_no
from medlava.eval.plots import plot_bars
from medlava.eval.text import (
    corpus_bleu,
    exact_match,
    pair_scores,
    token_f1,
    token_recall,
)
from medlava.io import InputError, atomic_write_json, atomic_write_text, read_jsonl

GROUP_KEYS = (
    "answer_type",
    "content_type",
    "modality",
    "subject",
    "question_type",
    "modality_type",
    "medical_task",
    "body_system",
    "source_dataset",
)
"""meta fields results are broken down by: SLAKE's, MMMU's subjects, OmniMedVQA's and MedXpertQA's categories."""
VQA_TASKS = ("closed", "open", "multiple_choice")
META_PREFIX = "meta_"
ROUTES = ("yes_no", "options", "vocab", "exact")
OUTPUTS = ("metrics.json", "per_sample.csv", "errors.csv", "closed_vocab.json", "vqa_groups.png")
_OR = re.compile(r"\s+or\s+")
# Without a comma, X of "X or Y" starts after the question's last function word ("is this an MRI or ...").
_LEAD = re.compile(r"\b(?:a|an|the|this|that|these|those|is|are|was|were|be|it|does|do|did|of|in|on|at|there)\s+")


def question_options(question: str) -> list[str]:
    """The two options of an "X or Y" question ("Which is bigger, the liver or the spleen?" -> liver, spleen).

    Without a comma or colon before it, X starts after the last function word and is at most as long as
    Y ("Is this the left lung or the right lung?" -> left lung, right lung)."""
    text = str(question).lower().strip()
    text = text.rsplit("?", 1)[0] if text.count("?") else text
    if not _OR.search(text):
        return []
    clause = re.split(r"[,:;]", text)[-1] if re.search(r"[,:;][^,:;]*\sor\s", text) else text
    left, right = _OR.split(clause, 1) if _OR.search(clause) else ("", "")
    right_words = normalize_text(right).split()
    if not right_words:
        return []
    if not re.search(r"[,:;][^,:;]*\sor\s", text):
        left = _LEAD.split(left)[-1]
    left_text = " ".join(normalize_text(left).split()[-len(right_words) :])
    return [left_text, " ".join(right_words)] if left_text else []


def vocabulary(answers: Iterable[str]) -> list[str]:
    """Distinct normalised closed answers other than yes/no (what routing falls back to)."""
    return sorted({a for a in (normalize_text(x) for x in answers) if a and a not in ("yes", "no")})


def load_closed_vocab(path: Path) -> list[str]:
    """A JSON list of answers, or the closed answers of a sample JSONL / LLaVA-Med question file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (eval.closed_vocab: a JSON list or a sample JSONL)")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise InputError(f"{path}: a closed vocabulary JSON file holds a list of answers")
        return vocabulary(map(str, data))
    answers = []
    for row in read_jsonl(path):
        meta = row.get("meta") or {}
        closed = (
            meta.get("task") == "closed" or str(row.get("answer_type", meta.get("answer_type", ""))).upper() == "CLOSED"
        )
        answer = meta.get("answer", row.get("answer"))
        if closed and answer is not None:
            answers.append(str(answer))
    return vocabulary(answers)


@lru_cache(maxsize=1024)
def _matcher(candidates: tuple[str, ...]) -> ChoiceMatcher:
    return ChoiceMatcher(candidates, synonyms={})


def route_closed(question: str, prediction: str, reference: str, vocab: tuple[str, ...]) -> tuple[str | None, str]:
    """(normalised answer the prediction names or None, route) for one closed question."""
    ref = normalize_text(reference)
    if ref in ("yes", "no"):
        return yes_no(prediction), "yes_no"
    options = question_options(question)
    if ref in options:
        candidates, route = tuple(options), "options"
    elif vocab:
        candidates, route = tuple(sorted({*vocab, ref})), "vocab"
    else:
        return normalize_text(prediction) or None, "exact"
    found = _matcher(candidates)(prediction).choice
    return (normalize_text(found) if found is not None else None), route


def _summary(part: pd.DataFrame) -> dict[str, Any]:
    closed, open_, mc = (part[part["task"] == t] for t in VQA_TASKS)
    out: dict[str, Any] = {"n": len(part), "n_closed": len(closed), "n_open": len(open_), "n_multiple_choice": len(mc)}
    if len(closed):
        out.update(
            closed_accuracy=float(closed["correct"].mean()),
            closed_unparsed=int(closed["mapped"].isna().sum()),
            llava_med_closed_accuracy=float(closed["llava_med_closed_hit"].mean()),
        )
    if len(open_):
        out.update(
            open_exact_match=float(open_["exact"].mean()),
            open_token_recall=float(open_["token_recall"].mean()),
            open_token_f1=float(open_["token_f1"].mean()),
            llava_med_open_recall=float(open_["llava_med_open_recall"].mean()),
        )
    if len(mc):
        out.update(mc_accuracy=float(mc["correct"].mean()), mc_unparsed=int(mc["mapped"].isna().sum()))
    mmmu = part[part["mmmu_correct"].notna()]
    if len(mmmu):
        out["mmmu_accuracy"] = float(mmmu["mmmu_correct"].astype(bool).mean())
    return out


def vqa_metrics(
    df: pd.DataFrame, vocab: list[str], n_bootstrap: int = 1000, seed: int = 0
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics and the per-sample table for rows with task closed/open/multiple_choice (others are counted and
    left out)."""
    tasks = df["task"].fillna("").astype(str)
    keep = tasks.isin(VQA_TASKS).to_numpy()
    excluded = {str(t): int(n) for t, n in tasks[~keep].replace("", "<empty>").value_counts().items()}
    df = df.loc[keep].reset_index(drop=True)
    if df.empty:
        raise InputError(f"no rows with task {'/'.join(VQA_TASKS)} to score as VQA; tasks: {excluded}")
    pred, ref = df["prediction"].fillna("").astype(str), df["reference"].fillna("").astype(str)
    prompts = df["prompt"].fillna("").astype(str) if "prompt" in df.columns else pd.Series([""] * len(df))
    closed, opened, mc = ((df["task"] == t).to_numpy() for t in VQA_TASKS)
    vocab_key = tuple(vocab)

    per = pd.DataFrame(
        {"id": df["id"].astype(str), "task": df["task"], "prompt": prompts, "reference": ref, "prediction": pred}
    )
    routed = [
        route_closed(q, p, r, vocab_key) if c else (p or None, "letter") if m else (None, None)
        for q, p, r, c, m in zip(prompts, pred, ref, closed, mc)
    ]
    per["route"] = [r for _, r in routed]
    per["mapped"] = [m for m, _ in routed]
    per["correct"] = [
        (c and m is not None and m == normalize_text(r)) or (k and m == r)
        for (m, _), r, c, k in zip(routed, ref, closed, mc)
    ]
    per["substring"] = [c and normalize_text(r) in normalize_text(p) for p, r, c in zip(pred, ref, closed)]
    per["exact"] = [exact_match(p, r) for p, r in zip(pred, ref)]
    per["token_recall"] = [token_recall(p, r) for p, r in zip(pred, ref)]
    per["token_f1"] = [token_f1(p, r) for p, r in zip(pred, ref)]
    # LLaVA-Med scores the raw answer text (its answers.jsonl `text`), not an answer mapped to a choice.
    raw = df["text"].fillna("").astype(str) if "text" in df.columns else pred
    per["llava_med_closed_hit"] = [c and llava_med_vqa.closed_hit(t, r) for t, r, c in zip(raw, ref, closed)]
    per["llava_med_closed_hit_run_eval"] = [
        c and llava_med_vqa.closed_hit_run_eval(t, r) for t, r, c in zip(raw, ref, closed)
    ]
    open_scores = np.array([llava_med_vqa.open_scores(t, r) for t, r in zip(raw, ref)], dtype=float).reshape(-1, 3)
    per["llava_med_open_recall"] = open_scores[:, 2]
    datasets = df[META_PREFIX + "dataset"] if META_PREFIX + "dataset" in df.columns else pd.Series([""] * len(df))
    per["mmmu_correct"] = [
        mmmu_correct(t, x, r, text) if d == "mmmu_med" else None
        for t, x, r, text, d in zip(df["task"], per["correct"], ref, raw, datasets)
    ]
    scores = pair_scores([normalize_text(p) for p in pred[opened]], [normalize_text(r) for r in ref[opened]])
    per.loc[opened, "bleu"] = scores["sentence_bleu_4"]
    for key in GROUP_KEYS:
        if META_PREFIX + key in df.columns:
            per[key] = df[META_PREFIX + key].fillna("").astype(str).to_numpy()

    c, o, k = per[closed], per[opened], per[mc]
    metrics: dict[str, Any] = {"family": "vqa", **_summary(per), "excluded_rows": excluded}
    if len(k):
        metrics["mc_unparsed_rate"] = float(k["mapped"].isna().mean())
    if len(c):
        yn = c[c["route"] == "yes_no"]
        metrics.update(
            closed_unparsed_rate=float(c["mapped"].isna().mean()),
            closed_routes={r: int((c["route"] == r).sum()) for r in ROUTES},
            closed_yes_no_accuracy=float(yn["correct"].mean()) if len(yn) else None,
            closed_exact_accuracy=float(c["exact"].mean()),
            closed_substring_accuracy=float(c["substring"].mean()),
            llava_med_closed_accuracy_run_eval=float(c["llava_med_closed_hit_run_eval"].mean()),
        )
    if len(o):
        metrics.update(open_bleu=float(o["bleu"].mean()), open_bleu_1=corpus_bleu(scores["bleu_stats"], 1))
        f1, precision, recall = open_scores[opened].mean(axis=0)
        metrics.update(
            llava_med_open_recall=float(recall), llava_med_open_precision=float(precision), llava_med_open_f1=float(f1)
        )
    mmmu = per[per["mmmu_correct"].notna()]
    metrics["ci95"] = {
        name: mean_ci(part[col].to_numpy(float), n_bootstrap, seed)
        for name, part, col in (
            ("closed_accuracy", c, "correct"),
            ("open_exact_match", o, "exact"),
            ("open_token_recall", o, "token_recall"),
            ("open_token_f1", o, "token_f1"),
            ("llava_med_closed_accuracy", c, "llava_med_closed_hit"),
            ("llava_med_open_recall", o, "llava_med_open_recall"),
            ("mc_accuracy", k, "correct"),
            ("mmmu_accuracy", mmmu, "mmmu_correct"),
        )
    }
    metrics["by_group"] = {
        key: {str(v): _summary(part) for v, part in per.groupby(key, sort=True)}
        for key in GROUP_KEYS
        if key in per.columns
    }
    metrics["vocab_size"] = len(vocab)
    metrics["conventions"] = {
        "normalisation": "lower case, punctuation and articles removed (SQuAD)",
        "closed_accuracy": "routed: yes_no, options from the question, train vocabulary, else exact; unparsed = wrong",
        "open_token_recall": "share of reference tokens found in the answer",
        "llava_med": "llava_med_*: LLaVA-Med v1.0's run_eval_batch.py on the raw answer text (closed: the reference "
        "inside the answer; open: recall), the script behind its paper's table; "
        "llava_med_closed_accuracy_run_eval: run_eval.py's closed rule (also needs yes/no in the answer)",
        "open_bleu": "mean sentence BLEU (sacrebleu, effective order); open_bleu_1: corpus BLEU-1",
        "mc_accuracy": "multiple choice: the option letter answered (by likelihood, or parsed from generated text with "
        "MMMU's parser) equals the answer; unparsed answers are wrong (mc_unparsed), never guessed",
        "mmmu_accuracy": "MMMU's rule on its rows: letters as mc_accuracy, open answers by MMMU's "
        "parse_open_response + eval_open",
    }
    return metrics, per


CHOICE_TASKS = ("closed", "multiple_choice")


def error_rank(per: pd.DataFrame) -> np.ndarray:
    """Worst first: unparsed answers to choice questions (-2), wrong ones (-1), open answers by token F1, right (9)."""
    choice = per["task"].isin(CHOICE_TASKS).to_numpy()
    wrong = np.where(per["mapped"].isna(), -2.0, -1.0)
    return np.where(choice, np.where(per["correct"].astype(bool), 9.0, wrong), per["token_f1"].astype(float))


def evaluate_vqa(
    df: pd.DataFrame,
    out_dir: Path,
    vocab: list[str],
    vocab_source: str | None,
    source: str,
    n_bootstrap: int = 1000,
    error_dump: int = 50,
) -> dict[str, Any]:
    """Write metrics.json, per_sample.csv, errors.csv, closed_vocab.json and a per-group chart."""
    out_dir = Path(out_dir)
    metrics, per = vqa_metrics(df, vocab, n_bootstrap)
    metrics.update(source=source, vocab_source=vocab_source)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUTS:
        (out_dir / stale).unlink(missing_ok=True)
    atomic_write_text(out_dir / "per_sample.csv", per.to_csv(index=False))
    # Worst first: unparsed closed, wrong closed, then open answers by token F1.
    if "text" in df.columns:
        per = per.assign(text=df.set_index(df["id"].astype(str))["text"].reindex(per["id"]).to_numpy())
    errors = per.assign(_rank=error_rank(per))
    errors = errors[~(errors["task"].isin(CHOICE_TASKS) & errors["correct"])]
    errors = errors.sort_values(["_rank", "id"], kind="stable").drop(columns="_rank").head(error_dump)
    atomic_write_text(out_dir / "errors.csv", errors.to_csv(index=False))
    atomic_write_json(out_dir / "closed_vocab.json", vocab)
    bars: dict[str, float | None] = {}
    for key, groups in metrics["by_group"].items():
        for value, s in groups.items():
            if "closed_accuracy" in s:
                bars[f"{key}={value} closed accuracy (n={s['n_closed']})"] = s["closed_accuracy"]
            if "open_token_recall" in s:
                bars[f"{key}={value} open recall (n={s['n_open']})"] = s["open_token_recall"]
    if not bars:
        bars = {k: metrics.get(k) for k in ("closed_accuracy", "open_token_recall") if k in metrics}
    plot_bars(bars, out_dir / "vqa_groups.png", title=f"VQA (n={metrics['n']})", xlabel="score")
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
