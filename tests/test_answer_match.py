"""Answer matching: every mode over signs, decimals, separators, exponents, Unicode, empty and
multi-line text; the three reported bugs; options that are refused."""

from __future__ import annotations

import typing

import pytest

from peftkit.answer_match import MATCH_MODES, MatchOptions, first_number, match_flags, matches, normalise

NONE = MatchOptions()
CASED = MatchOptions(case_sensitive=True)
LOOSE = MatchOptions(relative_tolerance=0.01)
ABS = MatchOptions(relative_tolerance=0.0, absolute_tolerance=0.5)
EXACT_NUMBER = MatchOptions(relative_tolerance=0.0)
ANSWER_IS = MatchOptions(pattern=r"answer is (-?\d+)")
ALTERNATIVES = MatchOptions(pattern=r"answer: (\w+)|#### (\w+)")
WHOLE = MatchOptions(pattern=r"\b[A-D]\b")
SENTIMENT = MatchOptions(choices=("positive", "negative", "neutral"))
GRADES = MatchOptions(choices=("positive", "very positive", "negative"))
LETTERS = MatchOptions(choices=("A", "B", "C", "D"), case_sensitive=True)
CITIES = MatchOptions(choices=("北京", "上海"))

CASES = [
    # -- the reported bugs ------------------------------------------------------------------------
    ("first_word", "5", "-5", NONE, False),  # a minus sign was ignored
    ("first_word", "-5", "5", NONE, False),
    ("first_word", "1,234", "1234", NONE, True),  # thousands separators scored 0
    ("first_word", "1,234", "1,235", NONE, False),  # ...and once read as "1" equal to any 1,xxx
    ("contains", "The answer is 15", "5", NONE, False),  # "15" contained "5"
    # -- exact --------------------------------------------------------------------------------------
    ("exact", "  Paris   is nice ", "paris IS nice", NONE, True),
    ("exact", "Paris, France", "Paris", NONE, False),
    ("exact", "Paris.", "Paris", NONE, False),  # exact is exact: trailing punctuation counts
    ("exact", "Paris", "paris", CASED, False),
    ("exact", "Paris", "Paris", CASED, True),
    ("exact", "ＡＢＣ １２３", "abc 123", NONE, True),  # full-width forms (NFKC)
    ("exact", "cafe\u0301", "café", NONE, True),  # combining accent composed
    ("exact", "cafe", "café", NONE, False),  # accents are not stripped
    ("exact", "STRASSE", "straße", NONE, True),  # case folding, not just lower-casing
    ("exact", "МОСКВА", "москва", NONE, True),
    ("exact", "don’t", "don't", NONE, True),  # typographic apostrophe
    ("exact", "", "", NONE, True),
    ("exact", "", "yes", NONE, False),
    ("exact", "yes", "", NONE, False),
    ("exact", "line one\nline two", "line one line two", NONE, True),  # newlines are whitespace
    # -- first_word ---------------------------------------------------------------------------------
    ("first_word", "Positive.", "positive", NONE, True),
    ("first_word", "positive sentiment overall", "Positive", NONE, True),
    ("first_word", "**Negative**", "negative", NONE, True),
    ("first_word", "Paris, France", "Paris", NONE, True),
    ("first_word", "The answer is positive", "positive", NONE, False),
    ("first_word", "don't know", "don't", NONE, True),
    ("first_word", "don't know", "don", NONE, False),
    ("first_word", "Positive", "positive", CASED, False),
    ("first_word", "-5.", "-5", NONE, True),
    ("first_word", "−5", "-5", NONE, True),  # U+2212 minus sign
    ("first_word", "+5", "5", NONE, True),
    ("first_word", "3.5", "3", NONE, False),
    ("first_word", "3.50 dollars", "3.5", NONE, True),  # numbers compare by value
    ("first_word", "-0.25", "-.25", NONE, True),
    ("first_word", "1,234,567", "1234567", NONE, True),
    ("first_word", "1,2,3", "1", NONE, True),  # commas not grouping three digits separate a list
    ("first_word", "1e3", "1000", NONE, True),
    ("first_word", "2.5E-4", "0.00025", NONE, True),
    ("first_word", "$5", "5", NONE, True),
    ("first_word", "-$5", "-5", NONE, True),
    ("first_word", "50%", "50", NONE, True),
    ("first_word", "５", "5", NONE, True),  # full-width digit
    ("first_word", "٤٢", "42", NONE, True),  # Arabic-Indic digits
    ("first_word", "Ответ: Москва", "ответ", NONE, True),
    ("first_word", "Éléphant!", "éléphant", NONE, True),
    ("first_word", "e-mail me", "e-mail", NONE, True),
    ("first_word", "", "positive", NONE, False),
    ("first_word", "positive", "", NONE, False),
    ("first_word", "...", "", NONE, True),  # neither has a word
    ("first_word", "\n\nYes\nbecause", "yes", NONE, True),
    # -- first_line ---------------------------------------------------------------------------------
    ("first_line", "Paris\nIt is the capital.", "paris", NONE, True),
    ("first_line", "\n  \nParis is nice\nmore", "Paris is nice", NONE, True),
    ("first_line", "Paris is nice\nmore", "Paris", NONE, False),
    ("first_line", "Paris\r\nmore", "Paris", NONE, True),
    ("first_line", "Paris", "paris", CASED, False),
    ("first_line", "", "Paris", NONE, False),
    ("first_line", "\n\n", "", NONE, True),
    # -- number -------------------------------------------------------------------------------------
    ("number", "The answer is -5.", "-5", NONE, True),
    ("number", "The answer is 5.", "-5", NONE, False),
    ("number", "-5", "5", NONE, False),
    ("number", "3.5", "3", NONE, False),
    ("number", "about 1,234.0 apples", "1234", NONE, True),
    ("number", "1 234", "1234", NONE, False),  # spaces never group digits: this reads 1
    ("number", "1,23", "123", NONE, False),  # not a thousands group: reads 1
    ("number", "1e3", "1000", NONE, True),
    ("number", "1.5E+3 units", "1500", NONE, True),
    ("number", "2.5e-4", "0.00025", NONE, True),
    ("number", "$1,000", "1000", NONE, True),
    ("number", "$-5", "-5", NONE, True),
    ("number", "50%", "50", NONE, True),
    ("number", "50%", "0.5", NONE, False),  # % is read past, not divided
    ("number", "COVID-19 cases", "19", NONE, True),  # a hyphen after a letter is not a sign
    ("number", "x = ５", "5", NONE, True),
    ("number", "٤٢", "42", NONE, True),
    ("number", "−7", "-7", NONE, True),
    ("number", "0.1 + 0.2 = 0.30000000000000004", "0.1", NONE, True),  # the first number
    ("number", "100.00005", "100", NONE, True),  # within the default relative 1e-6
    ("number", "100.001", "100", NONE, False),
    ("number", "100.001", "100", EXACT_NUMBER, False),
    ("number", "100", "100.0", EXACT_NUMBER, True),
    ("number", "99.5", "100", LOOSE, True),
    ("number", "0.4", "0", ABS, True),  # absolute tolerance for answers near zero
    ("number", "0.6", "0", ABS, False),
    ("number", "no idea", "42", NONE, False),
    ("number", "", "42", NONE, False),
    ("number", "#### 42", "The answer is 42", NONE, True),
    ("number", "v2", "2", NONE, False),  # digits glued to a word are not a number
    # -- contains -----------------------------------------------------------------------------------
    ("contains", "I think it is Paris.", "paris", NONE, True),
    ("contains", "London", "paris", NONE, False),
    ("contains", "Parisian food", "paris", NONE, False),  # word boundary
    ("contains", "The answer is -5.", "-5", NONE, True),
    ("contains", "The answer is -5.", "5", NONE, False),  # the sign belongs to the number
    ("contains", "The answer is +5.", "5", NONE, False),
    ("contains", "from 3-5 days", "5", NONE, True),  # a hyphen after a digit is no sign
    ("contains", "It is 3.5 m", "5", NONE, False),
    ("contains", "It is 3.5 m", "3", NONE, False),
    ("contains", "It is 3.5.", "3.5", NONE, True),
    ("contains", "1,234 people", "234", NONE, False),
    ("contains", "about 1,234 people", "1,234", NONE, True),
    ("contains", "1,2,3", "2", NONE, True),
    ("contains", "It costs $5.", "5", NONE, True),
    ("contains", "It is 5%", "5", NONE, True),
    ("contains", "It is 5.0", "5", NONE, False),  # text, not value: use number for that
    ("contains", "The capital is PARIS", "paris", CASED, False),
    ("contains", "Il s'agit du café", "CAFÉ", NONE, True),
    ("contains", "答案是北京。", "北京", NONE, True),  # no spaces in Chinese: every character is a boundary
    ("contains", "答案是上海。", "北京", NONE, False),
    ("contains", "Ответ: Москва.", "москва", NONE, True),
    ("contains", "line one\nthe answer\nis Paris", "answer is paris", NONE, True),  # lines join
    ("contains", "Paris?\nNo, the answer is Lyon", "Lyon", NONE, True),
    ("contains", "line one\nthe answer is Lyon", "paris", NONE, False),
    ("contains", "yes", "", NONE, False),  # an empty answer matches only an empty prediction
    ("contains", "", "", NONE, True),
    ("contains", "", "paris", NONE, False),
    # -- regex --------------------------------------------------------------------------------------
    ("regex", "so the answer is -12.", "-12", ANSWER_IS, True),
    ("regex", "so the answer is 12.", "-12", ANSWER_IS, False),
    ("regex", "I do not know", "12", ANSWER_IS, False),
    ("regex", "#### Paris", "paris", ALTERNATIVES, True),  # the first group that took part
    ("regex", "answer: Rome\n#### Paris", "rome", ALTERNATIVES, True),
    ("regex", "I pick C because", "c", WHOLE, True),  # no group: the whole match
    ("regex", "I pick C because", "B", WHOLE, False),
    ("regex", "so the answer is ４２", "42", ANSWER_IS, True),  # searched after NFKC
    ("regex", "", "12", ANSWER_IS, False),
    # -- choice -------------------------------------------------------------------------------------
    ("choice", "Positive! The review is great.", "positive", SENTIMENT, True),
    ("choice", "**Negative**", "negative", SENTIMENT, True),
    ("choice", "The sentiment is negative.", "negative", SENTIMENT, True),  # the only label mentioned
    ("choice", "The sentiment is negative.", "positive", SENTIMENT, False),
    ("choice", "Negative, not positive.", "negative", SENTIMENT, True),  # starts with a label
    ("choice", "It is positive or negative", "positive", SENTIMENT, False),  # two mentioned: ambiguous
    ("choice", "I cannot tell", "neutral", SENTIMENT, False),  # none
    ("choice", "", "neutral", SENTIMENT, False),
    ("choice", "positively", "positive", SENTIMENT, False),  # word boundaries
    ("choice", "Very positive!", "very positive", GRADES, True),  # the longest label starting it
    ("choice", "Very positive!", "positive", GRADES, False),
    ("choice", "I'd say very positive.", "very positive", GRADES, True),  # inside a longer label: no mention
    ("choice", "B", "B", LETTERS, True),
    ("choice", "The answer is (C).", "C", LETTERS, True),
    ("choice", "A or B", "A", LETTERS, True),
    ("choice", "b", "B", LETTERS, False),  # case sensitive labels
    ("choice", "答案是北京", "北京", CITIES, True),
    ("choice", "不是上海，是北京", "北京", CITIES, False),  # both mentioned, neither leads
]


@pytest.mark.parametrize("mode, prediction, answer, options, expected", CASES)
def test_match_modes(mode, prediction, answer, options, expected):
    assert matches(prediction, answer, mode, options) is expected


def test_every_mode_has_cases_both_ways():
    for mode in MATCH_MODES:
        outcomes = {expected for m, *_, expected in CASES if m == mode}
        assert outcomes == {True, False}, mode


def test_the_config_offers_exactly_the_modes():
    from peftkit.train.config import EvaluationConfig

    assert typing.get_args(typing.get_type_hints(EvaluationConfig)["match"]) == MATCH_MODES


def test_choice_takes_its_labels_from_the_answers_in_match_flags():
    predictions = ["Positive!", "The review is negative.", "neutral, maybe positive", "unclear", "Negative"]
    answers = ["positive", "negative", "positive", "negative", "Negative"]
    # "neutral" is not among the answers, so the third prediction mentions one label: positive.
    assert match_flags(predictions, answers, "choice") == [True, True, True, False, True]


def test_choice_needs_labels_for_a_single_pair():
    with pytest.raises(ValueError, match="needs options.choices"):
        matches("yes", "yes", "choice")


def test_choice_answer_outside_the_labels_is_an_error():
    with pytest.raises(ValueError, match=r"'maybe' is not one of the choices"):
        matches("maybe", "maybe", "choice", SENTIMENT)


def test_number_answer_without_a_number_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"expected answer 'Paris' contains no number"):
        matches("42", "Paris", "number")


@pytest.mark.parametrize(
    "mode, options, fragment",
    [
        ("regex", NONE, "pattern is required by match mode 'regex'"),
        ("regex", MatchOptions(pattern="answer is (\\d+"), "pattern is not a valid regular expression"),
        ("choice", MatchOptions(choices=()), "choices is an empty list"),
        ("choice", MatchOptions(choices=("yes", "")), "choices has an empty label"),
        ("choice", MatchOptions(choices=("Yes", "yes")), "the same label after normalisation"),
        ("number", MatchOptions(relative_tolerance=-0.1), "relative_tolerance must be >= 0"),
        ("number", MatchOptions(absolute_tolerance=float("nan")), "absolute_tolerance must be >= 0"),
        (
            "exact",
            MatchOptions(pattern="x"),
            "pattern is set but match mode 'exact' ignores it \\(it applies to regex\\)",
        ),
        ("exact", LOOSE, "relative_tolerance is set but match mode 'exact' ignores it"),
        ("number", CASED, "case_sensitive is set .* \\(it applies to every mode but number\\)"),
        ("first_word", SENTIMENT, "choices is set but match mode 'first_word' ignores it"),
        ("fuzzy", NONE, "unknown match mode 'fuzzy': use one of first_word, exact, contains"),
    ],
)
def test_bad_options_are_refused(mode, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        match_flags(["a"], ["1"], mode, options)


def test_case_sensitive_choices_may_differ_only_in_case():
    options = MatchOptions(choices=("Yes", "yes"), case_sensitive=True)
    assert match_flags(["yes"], ["yes"], "choice", options) == [True]


def test_match_flags_pair_up():
    with pytest.raises(ValueError, match="pair up"):
        match_flags(["a"], ["a", "b"])


@pytest.mark.parametrize(
    "text, value",
    [("-5", -5.0), ("is -5.", -5.0), ("1,234.5", 1234.5), (".5", 0.5), ("1e3", 1000.0), ("none", None)],
)
def test_first_number(text, value):
    assert first_number(text) == value


def test_normalise():
    assert normalise("  Ａ  b\tC\n") == "a b c"
    assert normalise("  Ａ  b\tC\n", case_sensitive=True) == "A b C"
