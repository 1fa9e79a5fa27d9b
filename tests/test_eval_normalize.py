"""The free-text normaliser: synonyms, word boundaries, negation, yes/no, and what it leaves unmapped."""

import pytest
from medlava.eval.normalize import ChoiceMatcher, map_answer, normalize_text, yes_no

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.mark.parametrize(
    ("text", "choice", "status"),
    [
        ("nv", "nv", "exact"),
        ("  NV. ", "nv", "exact"),
        ("A melanocytic nevus", "nv", "exact"),
        ("The lesion is a melanocytic nevus.", "nv", "mention"),
        ("basal-cell carcinoma", "bcc", "exact"),
        ("Basal cell carcinoma (BCC) on the nose", "bcc", "mention"),
        ("Bowen’s disease", "akiec", "exact"),
        ("seborrheic keratosis, a benign keratosis-like lesion", "bkl", "mention"),
        ("This is not melanoma; it is a dermatofibroma.", "df", "mention"),
        ("It looks like a benign keratosis-like lesion, not a melanoma", "bkl", "mention"),
        ("No evidence of melanoma. Most likely a nevus.", "nv", "mention"),
        ("more likely a nevus than a melanoma", "nv", "mention"),
        ("a mole or a melanoma", "nv", "first_of_several"),
        ("no, it is a melanoma", "mel", "mention"),
        ("vascular lesion (angioma)", "vasc", "mention"),
    ],
)
def test_maps_free_text_to_the_class_it_names(text, choice, status):
    got = map_answer(text, HAM)
    assert (got.choice, got.status) == (choice, status)


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("not melanoma", "negated"),
        ("melanoma is unlikely", "negated"),
        ("melanoma is not present", "negated"),
        ("non-melanoma skin lesion", "negated"),
        ("envelope", "unmapped"),  # "nv" inside a word is not the class
        ("pigmented lesion, cannot tell", "unmapped"),
        ("", "unmapped"),
    ],
)
def test_unmapped_answers_name_no_class(text, status):
    got = map_answer(text, HAM)
    assert got.choice is None and got.status == status


def test_plain_choices_without_synonyms_use_word_boundaries():
    m = ChoiceMatcher(["left lung", "right lung", "liver"], synonyms={})
    assert m("The right lung.").choice == "right lung"
    assert m("the left-lung").choice == "left lung"
    assert m("deliver").choice is None
    assert m("not the liver but the left lung").choice == "left lung"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Yes", "yes"),
        ("yes, there is an effusion", "yes"),
        ("No.", "no"),
        ("Nope", "no"),
        ("There is no pleural effusion", "no"),
        ("Absent", "no"),
        ("It is not present", "no"),
        ("I am not sure", None),
        ("cannot tell", None),
        ("normal", None),
        ("", None),
    ],
)
def test_yes_no(text, want):
    assert yes_no(text) == want
    got = map_answer(text, ["Yes", "No"])
    assert got.choice == (None if want is None else want.capitalize())


def test_normalize_text_is_squad_style():
    assert normalize_text("  The Left  Lung! ") == "left lung"
    assert normalize_text("An X-ray, a CT.") == "x ray ct"
