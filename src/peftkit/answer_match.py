"""Whether a generated answer matches the expected one: one function per match mode.

:func:`matches` scores one prediction; :func:`match_flags` scores an evaluation set (the
``choice`` mode takes its label set from the expected answers there). All text is read after
Unicode NFKC (full-width "５" is "5", "ﬁ" is "fi") with the typographic minus "−" and
apostrophe "’" read as "-" and "'".

``exact``       the whole strings after :func:`normalise` (strip, whitespace runs become one space,
                case-folded unless ``case_sensitive``).
``first_word``  the first word of each; surrounding punctuation is dropped ("Positive." is
                "positive", "don't" stays one word). A word that is a number keeps its sign,
                decimal point and thousands commas and compares by value: "-5" != "5", "3.5" != "3",
                "1,234" == "1234". Runs of letters count as one word, so a sentence in a script
                written without spaces (Chinese, Japanese, Thai) is a single word: use ``contains``.
``first_line``  the first non-empty line of the prediction, compared with the answer like ``exact``.
``number``      the first number of each (grammar below), equal within the tolerances
                (``math.isclose``); a prediction without a number is wrong; an answer without one
                is an error.
``contains``    the normalised answer occurs in the normalised prediction on word boundaries
                ("15" does not contain "5") and not inside a number: a sign belongs to its number,
                so "-5" contains "-5" but not "5", and "3.5" contains neither "3" nor "5". In scripts
                written without spaces every character is a boundary ("答案是北京" contains "北京").
``regex``       ``pattern`` is searched in the prediction (NFKC-normalised, case as generated); the
                first group that took part in the match, or the whole match for a pattern without
                groups, is compared with the answer like ``exact``; no match is wrong.
``choice``      classification by generation: the prediction is mapped to one label of ``choices``
                (default: the distinct expected answers) and is right when that label is the answer.
                A prediction that starts with a label (only punctuation before it, "**Yes**, ...")
                is that label, the longest one if several start there; otherwise the one label it
                mentions on word boundaries; several labels mentioned, or none, is wrong. An answer
                that is not one of ``choices`` is an error.

Empty text: an empty answer (no word, for ``first_word``) matches only an empty prediction.

Numbers: an optional sign (not after a letter or digit: "COVID-19" reads 19), an optional currency
symbol ``$ € £ ¥`` (dropped), digits with optional thousands commas in groups of exactly three
("1,234,567"; "1,23" is 1 then 23, a list), an optional decimal part (".5" too), an optional
exponent ("1e3", "2.5E-4") and an optional "%" (dropped, not divided: "50%" equals "50" but not
"0.5"). Spaces never group digits: "1 234" is 1 then 234, since models list numbers with spaces
far more often than they group thousands with them.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

# The old three first, so that messages listing the modes still read as they did.
MATCH_MODES = ("first_word", "exact", "contains", "first_line", "number", "regex", "choice")

_TYPOGRAPHIC = str.maketrans({"\u2212": "-", "\u2019": "'"})

_NUMBER = re.compile(
    r"""
    (?<![\w.])                               # not inside a word or after a decimal point
    (?P<sign>[-+](?=[$€£¥]?\.?\d))?          # a sign only in front of a number
    [$€£¥]?                                  # a currency symbol is read past
    (?P<digits>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)
    (?P<exponent>[eE][-+]?\d+)?
    %?                                       # read past, not divided by 100
    """,
    re.VERBOSE,
)

# The first word: letters or digits with inner apostrophes, hyphens, dots or thousands commas
# ("don't", "e-mail", "3.5", "1,234"), after a sign / currency symbol / point in front of a digit.
_FIRST_WORD = re.compile(r"(?:(?<![\w.])[-+]?[$€£¥]?\.?(?=\d))?\w+(?:(?:['.\-]|,(?=\d{3}(?!\d)))\w+)*")

# Scripts written without spaces between words: there, any character may end a word.
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\U00020000-\U0002fa1f]"
)


@dataclass(frozen=True)
class MatchOptions:
    """Settings of the match modes; each applies only to the modes named beside it."""

    case_sensitive: bool = False  # every mode but number
    relative_tolerance: float = 1e-6  # number
    absolute_tolerance: float = 0.0  # number
    pattern: str | None = None  # regex (required there)
    choices: tuple[str, ...] | None = None  # choice


def matches(
    prediction: str, answer: str, mode: str = "first_word", options: MatchOptions | None = None
) -> bool:
    """Whether ``prediction`` matches ``answer`` under ``mode`` (see the module docstring).

    ``choice`` needs ``options.choices`` here; :func:`match_flags` defaults them to the answers.
    """
    options = options or MatchOptions()
    _check(mode, options)
    if mode == "choice" and options.choices is None:
        raise ValueError(
            "match mode 'choice' needs options.choices to score a single prediction; "
            "match_flags takes them from the expected answers"
        )
    return _MODES[mode](prediction, answer, options)


def match_flags(
    predictions: Sequence[str],
    answers: Sequence[str],
    mode: str = "first_word",
    options: MatchOptions | None = None,
) -> list[bool]:
    """One correct flag per (prediction, answer) pair; ``choice`` without ``choices`` uses the
    distinct non-empty answers as the label set."""
    options = options or MatchOptions()
    _check(mode, options)
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers; they must pair up")
    if mode == "choice" and options.choices is None:
        labels = tuple(dict.fromkeys(a for a in answers if normalise(a, options.case_sensitive)))
        options = MatchOptions(case_sensitive=options.case_sensitive, choices=labels)
    return [_MODES[mode](p, a, options) for p, a in zip(predictions, answers)]


# Which modes read each option; setting one that the chosen mode ignores is refused.
_APPLIES_TO = {
    "case_sensitive": (set(MATCH_MODES) - {"number"}, "every mode but number"),
    "relative_tolerance": ({"number"}, "number"),
    "absolute_tolerance": ({"number"}, "number"),
    "pattern": ({"regex"}, "regex"),
    "choices": ({"choice"}, "choice"),
}


def option_problems(mode: str, options: MatchOptions) -> list[tuple[str, str]]:
    """What is wrong with ``options`` for ``mode``, as (option name, what to change) pairs.

    An option that ``mode`` ignores but that differs from its default is a problem too: it was
    set for a reason, and ignoring it silently would score otherwise than was meant.
    """
    problems: list[tuple[str, str]] = []
    for name in ("relative_tolerance", "absolute_tolerance"):
        value = getattr(options, name)
        if not value >= 0:  # also refuses nan
            problems.append((name, f"must be >= 0, got {value}"))
    if mode == "regex" and not options.pattern:
        problems.append(
            (
                "pattern",
                "is required by match mode 'regex': a regular expression whose first group "
                "(or whole match) is the answer",
            )
        )
    elif options.pattern:
        try:
            re.compile(options.pattern)
        except re.error as err:
            problems.append(("pattern", f"is not a valid regular expression ({err}): {options.pattern!r}"))
    if options.choices is not None:
        problems.extend(_choice_problems(options))
    defaults = MatchOptions()
    for name, (modes, described) in _APPLIES_TO.items():
        if mode not in modes and getattr(options, name) != getattr(defaults, name):
            problems.append(
                (
                    name,
                    f"is set but match mode {mode!r} ignores it (it applies to {described}): "
                    "remove it or change the mode",
                )
            )
    return problems


def _choice_problems(options: MatchOptions) -> list[tuple[str, str]]:
    if not options.choices:
        return [
            (
                "choices",
                "is an empty list: give the labels, or leave it unset to use the distinct expected answers",
            )
        ]
    seen: dict[str, str] = {}
    for choice in options.choices:
        key = normalise(choice, options.case_sensitive)
        if not key:
            return [("choices", f"has an empty label {choice!r}: every label needs text")]
        if key in seen:
            return [
                ("choices", f"has {seen[key]!r} and {choice!r}, which are the same label after normalisation")
            ]
        seen[key] = choice
    return []


def _check(mode: str, options: MatchOptions) -> None:
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown match mode {mode!r}: use one of {', '.join(MATCH_MODES)}")
    if problems := option_problems(mode, options):
        raise ValueError("; ".join(f"match option {name} {text}" for name, text in problems))


# --- normalisation and numbers ---------------------------------------------------------------


def normalise(text: str, case_sensitive: bool = False) -> str:
    """NFKC, stripped, whitespace runs as one space, case-folded unless ``case_sensitive``."""
    text = " ".join(_nfkc(text).split())
    return text if case_sensitive else text.casefold()


def first_number(text: str) -> float | None:
    """The value of the first number in ``text`` (see the module docstring), or None."""
    found = _NUMBER.search(_nfkc(text))
    return None if found is None else _value(found)


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHIC)


def _value(found: re.Match[str]) -> float:
    digits = found["digits"].replace(",", "")
    return float(f"{found['sign'] or ''}{digits}{found['exponent'] or ''}")


def _number_span(found: re.Match[str]) -> tuple[int, int]:
    """Sign to last digit: the part of a number that text matching must not cut into."""
    start = found.start("sign") if found["sign"] else found.start("digits")
    return start, found.end("exponent") if found["exponent"] else found.end("digits")


# --- the modes -------------------------------------------------------------------------------


def _exact(prediction: str, answer: str, options: MatchOptions) -> bool:
    return normalise(prediction, options.case_sensitive) == normalise(answer, options.case_sensitive)


def _first_word(prediction: str, answer: str, options: MatchOptions) -> bool:
    return _word_key(prediction, options) == _word_key(answer, options)


def _word_key(text: str, options: MatchOptions) -> float | str:
    """The first word as compared: a number's value, else its normalised text ("" if none)."""
    found = _FIRST_WORD.search(_nfkc(text))
    if found is None:
        return ""
    number = _NUMBER.fullmatch(found.group(0))
    if number is not None:
        return _value(number)
    return normalise(found.group(0), options.case_sensitive)


def _first_line(prediction: str, answer: str, options: MatchOptions) -> bool:
    line = next((line for line in prediction.splitlines() if line.strip()), "")
    return _exact(line, answer, options)


def _number(prediction: str, answer: str, options: MatchOptions) -> bool:
    expected = first_number(answer)
    if expected is None:
        raise ValueError(
            f"match mode 'number': the expected answer {answer!r} contains no number; fix the data "
            "or choose another evaluation.match mode"
        )
    predicted = first_number(prediction)
    return predicted is not None and math.isclose(
        predicted, expected, rel_tol=options.relative_tolerance, abs_tol=options.absolute_tolerance
    )


def _contains(prediction: str, answer: str, options: MatchOptions) -> bool:
    needle = normalise(answer, options.case_sensitive)
    text = normalise(prediction, options.case_sensitive)
    if not needle:  # an empty answer is "in" every text: only an empty prediction matches it
        return not text
    return bool(_occurrences(text, needle))


def _regex(prediction: str, answer: str, options: MatchOptions) -> bool:
    assert options.pattern is not None  # _check requires it
    found = re.search(options.pattern, _nfkc(prediction))
    if found is None:
        return False
    if found.re.groups:
        taken = [group for group in found.groups() if group is not None]
        if not taken:
            return False
        return _exact(taken[0], answer, options)
    return _exact(found.group(0), answer, options)


def _choice(prediction: str, answer: str, options: MatchOptions) -> bool:
    assert options.choices is not None  # matches / match_flags fill or require them
    labels = {normalise(c, options.case_sensitive): c for c in options.choices}
    expected = normalise(answer, options.case_sensitive)
    if expected not in labels:
        raise ValueError(
            f"match mode 'choice': the expected answer {answer!r} is not one of the choices "
            f"{list(options.choices)}; add it to evaluation.choices (or leave choices unset to use "
            "the distinct expected answers)"
        )
    return _choose(normalise(prediction, options.case_sensitive), list(labels)) == expected


def _choose(text: str, labels: list[str]) -> str | None:
    """The label ``text`` stands for (both normalised), or None when none or several fit."""
    spans = [(start, end, label) for label in labels for start, end in _occurrences(text, label)]
    leading = [label for start, _, label in spans if not re.search(r"\w", text[:start])]
    if leading:
        return max(leading, key=len)
    # A label inside a longer one's occurrence ("positive" in "very positive") is not a mention.
    mentioned = {
        label
        for start, end, label in spans
        if not any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans)
    }
    return mentioned.pop() if len(mentioned) == 1 else None


_MODES = {
    "first_word": _first_word,
    "exact": _exact,
    "contains": _contains,
    "first_line": _first_line,
    "number": _number,
    "regex": _regex,
    "choice": _choice,
}


# --- word boundaries -------------------------------------------------------------------------


def _occurrences(text: str, needle: str) -> list[tuple[int, int]]:
    """Where ``needle`` occurs in ``text`` on word boundaries and without cutting a number."""
    numbers = [_number_span(found) for found in _NUMBER.finditer(text)]
    spans = []
    start = text.find(needle)
    while start != -1:
        end = start + len(needle)
        cuts_number = any(s < start < e or s < end < e for s, e in numbers)
        joined = (start > 0 and _joins(text[start - 1], text[start])) or (
            end < len(text) and _joins(text[end - 1], text[end])
        )
        if not cuts_number and not joined:
            spans.append((start, end))
        start = text.find(needle, start + 1)
    return spans


def _joins(left: str, right: str) -> bool:
    """Whether two neighbouring characters belong to one word."""
    return _wordlike(left) and _wordlike(right)


def _wordlike(char: str) -> bool:
    return (char.isalnum() or char == "_") and not _UNSPACED.match(char)
