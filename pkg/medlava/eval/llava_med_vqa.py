"""LLaVA-Med v1.0's VQA scorer (llava/eval/run_eval_batch.py and run_eval.py with eval_metrics/), reproduced to the
number so results compare with LLaVA-Med's published tables: the `llava_med_*` metrics in metrics.json, beside
medlava's own.

Its rules, kept even where they are odd, because the published numbers come from them:
- answers are lower-cased and normalised by `normalize_word` (VQA's punctuation, number-word, article and
  contraction rules; at most 32 periods are stripped, a quirk of its `re.sub` call);
- closed (`closed_hit`, run_eval_batch.py: README "Option 1", the script whose eval_results_med_datasets.jsonl
  run_eval_metrics.ipynb turned into the paper's table): right when the normalised answer contains the normalised
  reference as a substring (its yes/no condition is commented out there);
- closed as run_eval.py ("Option 2") scores it (`closed_hit_run_eval`): the same, and the answer must also contain
  "yes" or "no" anywhere (so "normal", "know" count; "ct" or "x-ray" answers never do);
- open: recall (the paper's open number), precision and F1 over word counts, after normalising a second time
  (identical in both scripts).
Written here rather than imported: LLaVA-Med is no installable package, and its licence allows no copying;
tests/test_llava_med_scorer.py holds this to both originals' outputs on 600 generated cases.
"""

from __future__ import annotations

import re
from collections import Counter

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: a lookahead for "<=digit", i.e. almost any period
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)")
# The VQA evaluation's contraction table, less its entries that can never apply (capitalised or mapping to
# themselves: words are lower-cased first).
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
    howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll maam=ma'am
    mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't
    mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
    'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
    therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
    theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
    werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
    wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
""".split()
)


def normalize_word(text: str) -> str:
    """LLaVA-Med's normalize_word (eval_metrics/glossary.py)."""
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if strip_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out, 32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def f1_precision_recall(prediction: str, reference: str) -> tuple[float, float, float]:
    """LLaVA-Med's calculate_f1score on word counts (repeats count), both sides normalised again first."""
    pred = Counter(normalize_word(prediction).lower().split())
    ref = Counter(normalize_word(reference).lower().split())
    tp = sum(n for w, n in pred.items() if w in ref)
    fp = sum(n for w, n in pred.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in pred)
    if not pred or not ref or tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def closed_hit(prediction: str, reference: str) -> bool:
    """run_eval_batch.py's closed rule: the reference inside the answer, both normalised."""
    return normalize_word(reference.lower()) in normalize_word(prediction.lower())


def closed_hit_run_eval(prediction: str, reference: str) -> bool:
    """run_eval.py's closed rule: as closed_hit, and the answer holds "yes" or "no" somewhere."""
    pred = normalize_word(prediction.lower())
    return ("yes" in pred or "no" in pred) and normalize_word(reference.lower()) in pred


def open_scores(prediction: str, reference: str) -> tuple[float, float, float]:
    """(F1, precision, recall) of one open answer, as run_eval.evaluate computes them."""
    return f1_precision_recall(normalize_word(prediction.lower()), normalize_word(reference.lower()))
