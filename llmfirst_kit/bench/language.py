"""``llmfirst bench language``: do the kit's prompts cost quality? Each preset against ``bare`` (the model with only
a minimal system prompt, as a person would chat with it) on the same queries: the share of Korean queries answered
in Korean (and English in English), and key-fact recall.

The language of an answer is read from its words (:func:`~llmfirst_kit.quality.language.script_of`): an evaluation
metric computed after the fact, like key-fact recall; nothing a user sees is decided by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..backends import Backend, get_backend
from ..data import QUERIES
from ..errors import InvalidInput
from ..pipeline import Pipeline
from ..quality.facts import key_fact_recall, mean_recall
from ..quality.language import script_of
from ..quality.retention import bootstrap_ci
from ..study.queries import load_queries
from ..sync import gather_at_most


async def language(model: str | None = None, presets: Sequence[str] = ("bare", "direct", "staged"), *,
                   queries: str | Path = QUERIES, max_tokens: int = 48, concurrency: int = 8, cache: str = "reuse",
                   backend: Backend | None = None, n_threads: int | None = None) -> dict[str, Any]:
    """Per preset: language match by the query's language (with a bootstrap interval), mean key-fact recall.
    ``concurrency`` 1 with ``cache`` "cold" makes every answer the one the model gives alone from an empty cache
    (bit-reproducible); answers decoded in a batch can differ at near-ties."""
    if concurrency < 1 or max_tokens < 1:
        raise InvalidInput("concurrency and max_tokens must be at least 1")
    be = backend or get_backend("embedded", **({"n_threads": n_threads} if n_threads else {}))
    qs = list(load_queries(queries))
    out: dict[str, Any] = {"benchmark": "language", "model": be.resolve_model(model), "max_tokens": max_tokens,
                           "queries": len(qs), "concurrency": concurrency, "cache": cache, "presets": {}}
    for name in presets:
        pipe = Pipeline.from_preset(name, backend=be, model=model, max_tokens=max_tokens, cache=cache)

        async def answer(q: Any, pipe: Pipeline = pipe) -> str:
            answer = (await pipe.run(q.query)).answer_call()
            return answer.text if answer else ""

        texts = await gather_at_most(concurrency, (answer(q) for q in qs))
        row: dict[str, Any] = {}
        for lang in sorted({q.lang for q in qs}):
            hits = [float(script_of(t) == lang) for q, t in zip(qs, texts) if q.lang == lang]
            row[f"{lang}_answered_in_{lang}"] = round(sum(hits) / len(hits), 4)
            row[f"{lang}_answered_in_{lang}_ci95"] = list(bootstrap_ci(hits))
            row[f"{lang}_queries"] = len(hits)
        row["key_fact_recall"] = mean_recall(key_fact_recall(t, q.facts) for q, t in zip(qs, texts))
        out["presets"][name] = row
    return out
