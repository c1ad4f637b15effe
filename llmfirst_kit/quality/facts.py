"""Key-fact recall: an objective check beside the judge, for evaluation only.

Each query in ``data/queries/queries.jsonl`` carries reference key facts (``facts``): a fact is stated in
English (``en``) and Korean (``ko``) and has the surface forms that count as stating it (``any``: names,
numbers, terms in either language). A fact is recalled by an answer when one of its forms occurs in it
(case-folded, Unicode-normalised, whitespace and digit-group commas ignored). A form that begins or ends
with a Latin letter or digit must meet a word boundary there ("Au" is not found in "because"); a trailing
``*`` makes it a prefix ("render*" matches "rendering"). Korean forms match anywhere (particles attach to
words). Recall = recalled facts / facts.

This is a lexical measurement of what answers contain, like exact match or ROUGE: it is computed after the
fact, never decides anything and is never shown to a model (the facts themselves reach a reference-guided judge
as data, :mod:`.judge`), and the facts are never shown as an answer.
It undercounts paraphrases ("nine and a half million"), which is why the judge stays the quality verdict and
recall is reported beside it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

_SPACE = re.compile(r"\s+")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3})")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _DIGIT_COMMA.sub("", text)).strip()


def fact_forms(fact: Mapping[str, Any]) -> list[str]:
    return [normalise(str(f)) for f in fact.get("any", []) if str(f).strip()]


def _ascii_word(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


@functools.lru_cache(maxsize=4096)
def _pattern(form: str) -> re.Pattern[str]:
    prefix = form.endswith("*")
    core = form[:-1] if prefix else form
    head = r"(?<![0-9a-z])" if core and _ascii_word(core[0]) else ""
    tail = r"(?![0-9a-z])" if core and _ascii_word(core[-1]) and not prefix else ""
    return re.compile(head + re.escape(core) + tail)


def recalled(answer: str, fact: Mapping[str, Any]) -> bool:
    text = normalise(answer)
    return any(_pattern(form).search(text) for form in fact_forms(fact))


def key_fact_recall(answer: str, facts: Sequence[Mapping[str, Any]]) -> float | None:
    """Share of ``facts`` the answer states (None for a query without facts)."""
    if not facts:
        return None
    return sum(recalled(answer, f) for f in facts) / len(facts)


def reference_sentences(facts: Sequence[Mapping[str, Any]], lang: str) -> list[str]:
    """The facts as sentences in the query's language (English where a fact has none): what a
    reference-guided judge is shown."""
    return [str(f.get(lang) or f.get("en")) for f in facts if f.get(lang) or f.get("en")]


def mean_recall(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


__all__ = ["fact_forms", "key_fact_recall", "mean_recall", "normalise", "recalled", "reference_sentences"]
