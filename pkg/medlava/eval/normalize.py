"""Free-text answers -> one of a question's choices: synonyms, word boundaries, negation.

Hand-written: answer parsers in lmms-eval / VLMEvalKit fall back to a random choice when parsing fails;
here an answer that names no choice stays unmapped (scored wrong, counted), never guessed.

Rules, in order:
- yes/no questions (choices are exactly yes and no) go to `yes_no`: a leading yes/no word decides, else
  the first yes/no word anywhere; "not sure" / "cannot tell" stay unmapped.
- otherwise every choice is looked for by its own name and its synonyms ("melanocytic nevus" -> nv), as whole
  words (so "nv" is not found in "envelope"), case-, hyphen- and spacing-insensitive;
- a mention under negation ("not melanoma", "no evidence of melanoma", "melanoma is unlikely") does not count;
- the earliest remaining mention wins; when other choices are named too the status says so.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

# HAM10000 / ISIC 2018 diagnosis codes and the names models answer with (dermatology usage).
HAM10000_SYNONYMS: dict[str, tuple[str, ...]] = {
    "akiec": (
        "actinic keratosis",
        "actinic keratoses",
        "solar keratosis",
        "intraepithelial carcinoma",
        "bowen's disease",
        "bowens disease",
        "bowen disease",
        "squamous cell carcinoma in situ",
    ),
    "bcc": ("basal cell carcinoma", "basal cell carcinomas", "basalioma", "basal cell epithelioma"),
    "bkl": (
        "benign keratosis",
        "benign keratosis-like lesion",
        "benign keratosis-like lesions",
        "benign keratoses",
        "seborrheic keratosis",
        "seborrhoeic keratosis",
        "seborrheic keratoses",
        "solar lentigo",
        "lichen planus-like keratosis",
        "lplk",
    ),
    "df": ("dermatofibroma", "dermatofibromas", "benign fibrous histiocytoma"),
    "mel": ("melanoma", "melanomas", "malignant melanoma"),
    "nv": (
        "melanocytic nevus",
        "melanocytic nevi",
        "melanocytic naevus",
        "melanocytic naevi",
        "nevus",
        "nevi",
        "naevus",
        "naevi",
        "mole",
        "moles",
    ),
    "vasc": (
        "vascular lesion",
        "vascular lesions",
        "angioma",
        "hemangioma",
        "haemangioma",
        "cherry angioma",
        "angiokeratoma",
        "pyogenic granuloma",
    ),
}
YES = ("yes", "yeah", "yep", "true", "correct", "affirmative")
NO = ("no", "nope", "false", "incorrect", "negative")

_WORD = r"[a-z0-9]"
# Cue, then at most three more words (", an", "evidence of", "consistent with"), then the mention.
_NEG_BEFORE = re.compile(
    r"(?:\b(?:not|no|non|without|never|neither|nor|exclud\w*|ruled? out|rules out|rather than|instead of|"
    r"negative for|unlikely|absence of|free of|than)\b|\bnon-)"
    r"(?:\s+[a-z'-]+){0,3}\s*$"
)
# After the mention: "melanoma is (highly) unlikely / is not ...", "melanoma excluded" (not "nevus, not melanoma").
_NEG_AFTER = re.compile(
    r"^\s*(?:(?:is|are|was|were|seems?|appears?)\s+(?:(?:very|highly|most|rather)\s+)?not\b|"
    r"(?:(?:is|are|was|were|seems?|appears?)\s+)?(?:(?:very|highly|most|rather)\s+)?"
    r"(?:unlikely|excluded|ruled out|absent)\b)"
)
_CLAUSE_END = re.compile(r"[.;:!?]|\bbut\b|\bhowever\b|\bwhereas\b|\balthough\b")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_SPACE = re.compile(r"\s+")
_STRIP = " \t\n.!,;:\"'()[]"
_ARTICLE_LEAD = re.compile(r"^(?:an?|the)\s+")
_YES_NO_TOKEN = re.compile(r"[a-z]+")
_UNSURE = re.compile(
    r"\b(?:not sure|unsure|cannot (?:tell|say|determine)|can't (?:tell|say|determine)|"
    r"uncertain|unclear|unknown)\b"
)


def normalize_text(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, punctuation and articles out, single spaces."""
    text = _PUNCT.sub(" ", str(text).lower())
    return _SPACE.sub(" ", _ARTICLES.sub(" ", text)).strip()


def tokens(text: str) -> list[str]:
    return normalize_text(text).split()


def _key(phrase: str) -> str:
    """Lookup key of a phrase or matched text: lower case, hyphens and runs of spaces as one space."""
    return _SPACE.sub(" ", re.sub(r"[-\s]+", " ", phrase.lower().replace("\u2019", "'"))).strip()


def yes_no(text: str) -> str | None:
    """'yes', 'no' or None (no yes/no word, or an explicit "not sure")."""
    low = str(text).lower()
    words = _YES_NO_TOKEN.findall(low)
    if not words or _UNSURE.search(low):
        return None
    if words[0] in YES:
        return "yes"
    if words[0] in NO or words[0] == "absent":
        return "no"
    for w in words:
        if w in YES:
            return "yes"
        if w in NO or w in ("not", "none"):
            return "no"
    return None


@dataclass(frozen=True)
class Mapped:
    choice: str | None
    status: str
    """exact (the whole answer names it) | mention (found inside the text) | first_of_several (other
    choices were named too; the earliest won) | negated (only negated mentions) | unmapped."""


class ChoiceMatcher:
    """Maps free text to one of `choices`; build once per choice list (see `matcher_for`)."""

    def __init__(self, choices: Sequence[str], synonyms: Mapping[str, Iterable[str]] | None = None):
        self.choices = tuple(str(c) for c in choices)
        synonyms = HAM10000_SYNONYMS if synonyms is None else synonyms
        self.yes_no = {_key(c) for c in self.choices} == {"yes", "no"}
        self._by_key: dict[str, str] = {}
        for c in self.choices:
            for phrase in (c, *synonyms.get(c, ()), *synonyms.get(c.lower(), ())):
                self._by_key.setdefault(_key(phrase), c)
        # Longest phrase first, so "melanocytic nevus" wins over "nevus" at the same position.
        alternatives = sorted(self._by_key, key=len, reverse=True)
        body = "|".join(r"[\s-]+".join(map(re.escape, k.split(" "))) for k in alternatives)
        self._pattern = re.compile(rf"(?<!{_WORD})(?:{body})(?!{_WORD})")

    def __call__(self, text: str) -> Mapped:
        low = str(text).lower().replace("\u2019", "'")
        whole = _key(_ARTICLE_LEAD.sub("", low.strip(_STRIP)))
        if self.yes_no:
            answer = yes_no(low)
            choice = next((c for c in self.choices if _key(c) == answer), None)
            return Mapped(choice, "unmapped" if choice is None else "exact" if whole == answer else "mention")
        if whole in self._by_key:
            return Mapped(self._by_key[whole], "exact")
        kept: list[str] = []
        negated = False
        for m in self._pattern.finditer(low):
            choice = self._by_key[_key(m.group(0))]
            if self._negated(low, m.start(), m.end()):
                negated = True
            elif choice not in kept:
                kept.append(choice)
        if kept:
            return Mapped(kept[0], "mention" if len(kept) == 1 else "first_of_several")
        return Mapped(None, "negated" if negated else "unmapped")

    @staticmethod
    def _negated(text: str, start: int, end: int) -> bool:
        before = text[:start]
        clauses = list(_CLAUSE_END.finditer(before))
        before = before[clauses[-1].end() :] if clauses else before
        after = _CLAUSE_END.split(text[end:], 1)[0]
        return bool(_NEG_BEFORE.search(before) or _NEG_AFTER.search(after))


@lru_cache(maxsize=256)
def matcher_for(choices: tuple[str, ...]) -> ChoiceMatcher:
    return ChoiceMatcher(choices)


def map_answer(text: str, choices: Sequence[str]) -> Mapped:
    """The choice that free-text `text` names (HAM10000 synonyms known), or None with the reason."""
    return matcher_for(tuple(str(c) for c in choices))(text)
