"""What medlava is held to the original LLaVA / LLaVA-Med code on: the tokenizers and the samples.

Shared by the tests and by tests/reference/regenerate.py, which ran the original functions on exactly these to
write tests/reference/*.json.
"""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
from pathlib import Path

from medlava.models.tiny import build_tokenizer
from tokenizers import AddedToken
from transformers import LlamaTokenizer

DATA = Path(__file__).parent / "data"
REFERENCE = Path(__file__).parent / "reference"
N_IMAGE = 16  # image tokens per placeholder in medlava (the original keeps one IMAGE_TOKEN_INDEX)


@functools.cache
def tokenizer(name: str):
    """`tiny`: the tiny model's; `mistral`: Mistral-7B's real one, configured as its tokenizer_config.json
    (add_bos_token, legacy), LLaVA training's model_max_length 2048 and `<image>` added as medlava's converter adds
    it."""
    if name == "tiny":
        return build_tokenizer(512)
    if name == "mistral":
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(DATA / "mistral-7b-tokenizer.model", Path(tmp) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(
                tmp, add_bos_token=True, add_eos_token=False, legacy=True, model_max_length=2048
            )
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        tok.pad_token = tok.unk_token  # as LLaVA's train.py and LLaVA-Med's checkpoint set it
        return tok
    raise ValueError(name)


TOKENIZERS = ("tiny", "mistral")
TEMPLATES = ("mistral_instruct", "vicuna_v1", "plain")


def _conv(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


# (name, has_image, conversations): single-turn, multi-turn and image-less samples; the image placeholder
# first, last (as LLaVA-Med's qa50 and instruct data have it) and mid-sentence; untrimmed text; numbers.
CASES = [
    ("first", True, _conv("<image>\nWhat is the lesion type?", "nv")),
    ("last", True, _conv("What is shown in the image?\n<image>", "A chest x-ray, PA view.")),
    ("middle", True, _conv("Look: <image> what is it?", "mel")),
    ("untrimmed", True, _conv("  <image>  Describe the mass.  ", " It is 3.5 cm, left-sided.\nNo effusion. ")),
    (
        "multi_turn",
        True,
        _conv(
            "Which organ is shown?\n<image>",
            "The liver.",
            "Is it enlarged?",
            "Yes, mildly (18 cm).",
            "What else?",
            "A 2-cm cyst in segment IV; no ascites.",
        ),
    ),
    ("text_only", False, _conv("Is a melanocytic nevus benign?", "Usually, yes.")),
    (
        "text_only_multi_turn",
        False,
        _conv("What does CT stand for?", "Computed tomography.", "And MRI?", "Magnetic resonance imaging."),
    ),
]
# Option lists scored by likelihood after the first case's question.
CHOICES = [["yes", "no"], ["akiec", "bcc", "vascular lesion"], ["3.5 cm", "Left lung.", "T2-weighted MRI"]]


def applies(template: str, has_image: bool, conversations: list[dict]) -> bool:
    """plain (alignment) takes one image-caption pair, as LLaVA's preprocess_plain asserts."""
    return template != "plain" or (has_image and len(conversations) == 2)


_WORDS = [
    "yes",
    "no",
    "Yes",
    "No.",
    "not",
    "none",
    "normal",
    "abnormal",
    "left",
    "right",
    "lung",
    "lungs",
    "the",
    "a",
    "an",
    "liver",
    "CT",
    "MRI",
    "x-ray",
    "T2-weighted",
    "one",
    "two",
    "three",
    "zero",
    "ten",
    "1",
    "2",
    "3.5",
    "1,000",
    "10,5",
    "e.g.",
    "cm.",
    "(left)",
    "[right]",
    "lesion;",
    "lobe,",
    "upper/lower",
    "dont",
    "don't",
    "isnt",
    "it's",
    "well-defined",
    "?",
    "!",
    "-",
    '"mass"',
    "<b>",
    "50%",
    "x",
    "pleural effusion",
    "know",
    "nodule",
    "nodules",
    "mid-line",
    "a.m.",
    "3 . 5",
    ", ",
    " . ",
    "right-sided",
]


def scorer_cases(n: int = 600, seed: int = 12) -> list[tuple[str, str]]:
    """(prediction, reference) pairs: random word strings mixing yes/no, numbers, number words, punctuation,
    articles, contractions and repeats, plus repeats of the reference inside the prediction."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        ref = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
        pred = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.3:
            pred = f"{pred} {ref} {ref}" if rng.random() < 0.5 else f"{ref}{rng.choice(['', '.', ',', '!'])}"
        if rng.random() < 0.2:
            pred = pred.upper()
        pairs.append((pred, ref))
    return pairs


_OPTION_TEXTS = [
    "Pneumonia",
    "pleural effusion",
    "a",
    "B cell lymphoma",
    "no abnormality",
    "left lung",
    "3.5 cm",
    "Hypertrophic cardiomyopathy",
    "CT",
    "(C) misleading",
    "none of the above",
    "Magnetic resonance",
]
_FRAMES = [
    "{}",
    "({})",
    "{}.",
    "Answer: {}",
    "The answer is {}.",
    "The answer is ({}).",
    "{}) {}",
    "Option {}",
    "I think it is {} because",
    "{}, {}",
    "({}) or ({})",
    "Not {} but {}",
    "{}:",
    "'{}'",
    "**{}**",
    "{}\n\n",
]
_FILLER = [
    "the",
    "image",
    "shows",
    "most",
    "likely",
    "is",
    "which",
    "answer",
    "this",
    "lesion",
    "I",
    "think",
    "so",
    "a",
    "A",
    "case",
    "of",
    "and",
    "B.",
    "(D)",
    "therefore",
    "it",
    "could",
    "be",
    "2",
    "=",
    "3.50",
    "1,000",
]


def mmmu_choice_cases(n: int = 400, seed: int = 19) -> list[tuple[str, dict[str, str]]]:
    """(response, letter -> option text): letters bare, bracketed, punctuated, in sentences, several at once, option
    texts quoted in long answers, and answers naming nothing (where MMMU picks at random)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        k = rng.randint(2, 5)
        options = dict(zip("ABCDE", rng.sample(_OPTION_TEXTS, k)))
        letters = list(options)
        kind = rng.random()
        if kind < 0.45:
            frame = rng.choice(_FRAMES)
            picks = [rng.choice(letters + ["E", "F"]) for _ in range(frame.count("{}"))]
            response = frame.format(*picks)
        elif kind < 0.75:  # a sentence, with or without an option's text in it
            words = [rng.choice(_FILLER) for _ in range(rng.randint(2, 12))]
            if rng.random() < 0.6:
                words.insert(rng.randint(0, len(words)), rng.choice(list(options.values())))
            response = " ".join(words)
        else:
            words = [rng.choice(_FILLER) for _ in range(rng.randint(0, 8))]
            response = " ".join(words + [rng.choice(letters)] * rng.randint(0, 2))
        if rng.random() < 0.15:
            response = rng.choice(",.!?;:'") + response + rng.choice(["", ".", "!", "'"])
        cases.append((response, options))
    return cases


_GOLDS = ["2", "3.5", "1,000", "Transformation", "C", "0.25", "-4", "1e-3", "left ventricle", "B", "12.345"]


def mmmu_open_cases(n: int = 300, seed: int = 23) -> list[tuple[str, str | list[str]]]:
    """(response, gold): numbers in every notation, answers after "is"/"so"/"=", several sentences and lines, one-
    letter golds, and lists of accepted answers."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        gold: str | list[str] = rng.choice(_GOLDS)
        if rng.random() < 0.15:
            gold = rng.sample(_GOLDS, 2)
        lines = []
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(_FILLER) for _ in range(rng.randint(0, 7))]
            if rng.random() < 0.5:
                words.append(rng.choice(_GOLDS + ["3.50", "1000", "2.0", "Left Ventricle", "c"]))
            lines.append(" ".join(words) + rng.choice(["", ".", ". ", "!"]))
        cases.append((rng.choice(["\n", " ", ". "]).join(lines), gold))
    return cases
