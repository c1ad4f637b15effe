"""A study's queries: loaded from JSONL or CSV, selected by id or by count. Labels (category, language) and
reference key facts are stored beside each run for evaluation; no answering model ever sees them (a
reference-guided judge sees them as data, as MT-Bench's judge sees a reference answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import InvalidInput


@dataclass(frozen=True)
class Query:
    id: str
    query: str
    lang: str = ""
    category: str = ""
    twin: str | None = None  # the same query in the other language (the judge gate's wrong-language answers)
    facts: tuple[dict[str, Any], ...] = ()  # reference key facts: key-fact recall, the judge's references

    def labels(self) -> dict[str, str]:
        """Evaluation labels stored beside a run; never shown to a model."""
        return {"query_id": self.id, "lang": self.lang, "category": self.category}


def load_queries(path: str | Path, *, ids: Iterable[str] = (), limit: int = 0) -> list[Query]:
    """Queries from JSONL (one object a line) or CSV, each with ``id`` and ``query`` (``lang``, ``category``
    optional). ``ids`` selects and orders them; without ids, ``limit`` keeps the first N (0: all)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"queries file {str(path)!r} does not exist; pass a JSONL or CSV file (see "
                           f"llmfirst_kit/assets/queries/)")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{path}:{n}: not JSON ({exc.msg}); one JSON object a line") from None
    queries = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not str(row.get("query") or "").strip() or not row.get("id"):
            raise InvalidInput(f"{path}: query {n} needs a non-empty 'id' and 'query'")
        facts = row.get("facts") or ()
        if isinstance(facts, str):  # a CSV cell holds JSON
            facts = json.loads(facts) if facts.strip() else ()
        queries.append(Query(id=str(row["id"]), query=str(row["query"]), lang=str(row.get("lang") or ""),
                             category=str(row.get("category") or ""), twin=str(row["twin"]) if row.get("twin") else None,
                             facts=tuple(facts)))
    by_id = {q.id: q for q in queries}
    if len(by_id) != len(queries):
        raise InvalidInput(f"{path}: query ids must be unique")
    ids = list(ids)
    if ids:
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise InvalidInput(f"unknown query id(s) {', '.join(unknown)} in {path}; known: {', '.join(by_id)}")
        queries = [by_id[i] for i in ids]
    elif limit:
        queries = queries[:limit]
    if not queries:
        raise InvalidInput(f"no queries selected from {path}")
    return queries
