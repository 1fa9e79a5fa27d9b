"""Multiple-choice parsing against MMMU's own functions (tests/reference/mmmu_parsing.json, written by
tests/reference/regenerate.py from MMMU-Benchmark/MMMU's eval_utils.py), and by hand."""

import json

import pytest
from medlava.data.benchmark import option_letters
from medlava.eval.multiple_choice import open_correct, open_gold, parse_letter, parse_open
from reference_cases import REFERENCE, mmmu_choice_cases, mmmu_open_cases

REF = json.loads((REFERENCE / "mmmu_parsing.json").read_text())


def test_cases_are_the_generated_ones_and_reach_every_rule():
    assert [(c["response"], c["options"]) for c in REF["choice"]] == [(r, o) for r, o in mmmu_choice_cases()]
    assert [(c["response"], c["gold"]) for c in REF["open"]] == mmmu_open_cases()
    letters = [c["letter"] for c in REF["choice"]]
    assert None in letters and len(set(letters) - {None}) >= 4  # MMMU guessed on some: we must not
    assert 0 < sum(c["correct"] for c in REF["open"]) < len(REF["open"])


def test_parse_letter_equals_mmmu_except_that_it_never_guesses():
    for c in REF["choice"]:
        assert parse_letter(c["response"], c["options"]) == c["letter"], c


def test_parse_open_and_open_correct_equal_mmmu():
    for c in REF["open"]:
        parsed = parse_open(c["response"])
        assert sorted(map(repr, parsed)) == c["parsed"], c
        assert open_correct(c["gold"], parsed) == c["correct"], c


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is (A).", "A"),
        ("A or (B)", "B"),  # a bracketed letter wins
        ("A. Pneumonia, but B later", "B"),  # several bare letters: the last one
        ("I believe the image shows a pleural effusion here", "B"),  # > 5 words: the option's text
        ("effusion", None),
        ("I cannot tell.", None),  # names nothing: unparsed, never a random pick
    ],
)
def test_parse_letter_by_hand(response, letter):
    assert parse_letter(response, {"A": "Pneumonia", "B": "pleural effusion", "C": "Normal"}) == letter


def test_open_rule_and_gold_lists_by_hand():
    assert open_correct("3.5", parse_open("so the size is 3.50 cm")) is True  # numbers compared rounded
    assert open_correct("2", parse_open("it is 12")) is False  # no digit-in-number match
    assert open_correct(["24/7", "3.429"], parse_open("thus 3.4286")) is True  # both round to 3.43
    assert open_gold("['a', 'b']") == ["a", "b"]
    assert open_gold("Transformation") == "Transformation" and option_letters(3) == ["A", "B", "C"]
    with pytest.raises(ValueError, match="2 to 26 options"):
        option_letters(1)
