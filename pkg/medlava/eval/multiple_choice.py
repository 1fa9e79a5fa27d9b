"""Multiple-choice answers: which option letter a free-text answer names, and MMMU's rule for its open questions.

`parse_letter` is MMMU's parse_multi_choice_response (mmmu/utils/eval_utils.py of MMMU-Benchmark/MMMU), rule for
rule, except its last resort: where MMMU picks a random letter, this returns None, so the answer is scored wrong and
counted as unparsed (an answer "I cannot tell" must not earn a 1-in-4 chance). `parse_open` / `open_correct` are
its parse_open_response / eval_open. Written here rather than imported: MMMU is no installable package.
tests/test_multiple_choice.py holds these to the original functions' outputs (tests/reference/mmmu_parsing.json).

In score mode (the default) infer answers multiple choice by the likelihood of each option letter, so no parsing
happens at all; the parser is for `infer.mode=generate`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence

_STRIPPED = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_SENTENCE = re.compile(r"\.\s(?=[A-Z])|\n")  # MMMU splits after lower-casing, so only newlines split in practice
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def _last(candidates: list[str], position) -> str:
    """The candidate found last (MMMU: np.argmax over rfind positions, so the first of equal ones)."""
    positions = [position(c) for c in candidates]
    return candidates[positions.index(max(positions))]


def parse_letter(response: str, options: Mapping[str, str]) -> str | None:
    """The letter of `options` (letter -> option text) that `response` names, or None when it names none."""
    for char in _STRIPPED:
        response = response.strip(char)
    response = f" {response} "  # spaces around, so " A " matches a letter at either end
    letters = list(options)
    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    by_content = False
    if not candidates and len(response.split()) > 5:  # a sentence: look for an option's text
        low = response.lower()
        candidates = [c for c, text in options.items() if str(text).lower() in low]
        by_content = bool(candidates)
    if not candidates:
        return None  # MMMU: random.choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        return _last(candidates, lambda c: response.lower().rfind(str(options[c]).lower()))
    if bracketed:
        return _last(candidates, lambda c: response.rfind(f"({c})"))
    return _last(candidates, lambda c: response.rfind(f" {c} "))


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_open(text: str) -> list[str | float]:
    """MMMU's normalize_str: a number rounded to 2 decimals, else the lower-cased text (a single character padded
    with a space on either side, to avoid trivial matches)."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _numbers(text: str) -> list[str]:
    return _NUM_COMMAS.findall(text) + _NUM_SCIENTIFIC.findall(text) + _NUM_SIMPLE.findall(text)


def _key_responses(response: str) -> list[str]:
    """The tails of the response's sentences after answer-introducing words ("so ", "is ", ...)."""
    response = response.strip().strip(".").lower()
    parts = _SENTENCE.split(response)
    found = []
    for i, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            found.append(shortest)
    return found or [response]


def parse_open(response: str) -> list[str | float]:
    """MMMU's parse_open_response: candidate answers (texts and numbers, normalised) found in a free response."""
    keys = _key_responses(response)
    candidates = keys + [n for k in keys for n in _numbers(k)]
    return list({v: None for c in candidates for v in normalize_open(c)})  # dedup; MMMU's set() order is moot


def open_correct(gold: str | Sequence[str], predictions: list[str | float]) -> bool:
    """MMMU's eval_open: a text gold inside a text candidate, or a number gold equal to a number candidate."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm = [g for answer in golds for g in normalize_open(answer)]
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in norm):
                return True
        elif pred in norm:
            return True
    return False


def open_gold(answer: str) -> str | list[str]:
    """An MMMU answer as its dataset stores it: one text, or a Python list literal of accepted answers."""
    text = str(answer).strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, list):
            return [str(v) for v in value]
    return text


def mmmu_correct(task: str, letter_correct: bool, reference: str, text: str) -> bool:
    """One MMMU question scored by MMMU's evaluate: a multiple-choice one by its letter, an open one by eval_open on
    parse_open_response of the raw answer."""
    if task == "multiple_choice":
        return bool(letter_correct)
    return open_correct(open_gold(reference), parse_open(text))
