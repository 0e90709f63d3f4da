"""Answer normalisation of the VQA evaluation, as lmms-eval 0.7.3 applies it.

lmms-eval scores TextVQA and VQAv2 with the EvalAI answer processor
(`lmms_eval/tasks/_task_utils/vqa_eval_metric.py`). This module implements the same
rules, quirks included, so our scores match lmms-eval's to the last digit:

* `tokenize_words`: lower-case, drop `,` and `?`, split `'s` off its word.
* `strip_punctuation`: each punctuation mark is deleted when the text has it next to
  a space (or has a comma between digits anywhere), else replaced by a space; then
  periods not followed by a digit are deleted, at most `MAX_PERIODS_REMOVED` of them.
* `map_digits_articles`: number words zero..ten (and "none") become digits, articles
  are dropped, and apostrophe-less contractions get their apostrophes back.

`normalise_answer` chains all three (the TextVQA path); VQAv2 skips `tokenize_words`.
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!")
"""Marks removed or spaced out; `.` is handled separately, `'` and `:` are kept."""

DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
"""A comma between digits ("1,000"): when present, punctuation is deleted, not spaced."""

LONE_PERIOD = re.compile(r"\.(?!\d)")
"""A period not followed by a digit ("3.5" keeps its period)."""

MAX_PERIODS_REMOVED = 32
"""lmms-eval passes `re.UNICODE` (= 32) as the `count` argument of `re.sub`, so only the
first 32 lone periods of an answer are removed; we keep that limit to score alike."""

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

_CONTRACTED_FORMS = """
'ow's'at 'twas ain't aren't can't could've couldn't couldn't've didn't doesn't don't
hadn't hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've
it'll ma'am might've mightn't mightn't've must've mustn't needn't not've o'clock oughtn't
shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's
where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've
"""
"""Contractions the evaluation restores. Not "she's" or "let's": the table maps those
only to themselves, so "shes" and "lets" stay as they are."""


def _spellings_without_apostrophe(form: str) -> list[str]:
    """The misspellings restored to `form`: with one apostrophe, the form without it;
    with several, each spelling that lacks exactly one of them ("hed've", "he'dve")."""
    marks = [i for i, ch in enumerate(form) if ch == "'"]
    if len(marks) == 1:
        return [form.replace("'", "")]
    return [form[:i] + form[i + 1:] for i in marks]


def _build_contractions() -> dict[str, str]:
    table = {spelling: form for form in _CONTRACTED_FORMS.split()
             for spelling in _spellings_without_apostrophe(form)}
    # An entry of the original table that runs backwards; kept so scores agree.
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS: dict[str, str] = _build_contractions()
"""Lower-case word -> restored contraction. The original table also has capitalised
keys ("Im", "Ive"); text is lower-cased before lookup, so those never apply."""


def tokenize_words(text: str) -> str:
    """Lower-case, drop commas and question marks, split off "'s"; TextVQA only."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def strip_punctuation(text: str) -> str:
    """Delete or space out punctuation, then delete lone periods (see module docstring)."""
    delete_all = DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test reads the input text, not the text being rewritten.
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    return LONE_PERIOD.sub("", out, count=MAX_PERIODS_REMOVED)


def map_digits_articles(text: str) -> str:
    """Number words to digits, articles dropped, contractions restored; words re-joined
    by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalise_answer(text: str) -> str:
    """The full EvalAI processing (what lmms-eval's TextVQA applies to every answer)."""
    text = tokenize_words(text).replace("\n", " ").replace("\t", " ").strip()
    return map_digits_articles(strip_punctuation(text))


def normalise_vqav2_answer(text: str) -> str:
    """What lmms-eval's VQAv2 applies: whitespace cleanup, punctuation, digits/articles;
    no `tokenize_words` (commas and "?" go through `strip_punctuation` instead)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return map_digits_articles(strip_punctuation(text))
