"""The language of an answer, read from its words: an evaluation metric computed after the fact (like key-fact
recall), never shown to a model and never used to decide anything about a response.

A word with Hangul in it is Korean, a word of Latin letters only is English, and the answer is in the language of
most of its words ("HTTP는 HyperText Transfer Protocol입니다." is Korean; counted by letters, as first planned, the
acronym's letters made it English)."""

from __future__ import annotations

from typing import Iterable


def _hangul(ch: str) -> bool:
    return "\uac00" <= ch <= "\ud7a3" or "\u1100" <= ch <= "\u11ff" or "\u3130" <= ch <= "\u318f"


def script_of(text: str) -> str | None:
    """``"ko"`` when most words are Korean (hold Hangul), ``"en"`` when most are English (Latin letters only),
    None without either."""
    korean = english = 0
    for word in text.split():
        if any(_hangul(ch) for ch in word):
            korean += 1
        elif any(ch.isascii() and ch.isalpha() for ch in word):
            english += 1
    if not korean and not english:
        return None
    return "ko" if korean >= english else "en"


def language_match(pairs: Iterable[tuple[str, str]]) -> float | None:
    """The share of (answer, query language) pairs answered in the query's language; None without any pair
    whose language is ``"ko"`` or ``"en"``."""
    hits = [script_of(text) == lang for text, lang in pairs if lang in ("ko", "en")]
    return sum(hits) / len(hits) if hits else None
