"""The judge gate: before any quality verdict, the judge must show it can tell a real answer from a bad one.

Known-bad answers are built automatically from real ones (the baseline's complete answers that hold all their
query's reference key facts: a wrong "real" answer is not known-good), one of each kind per real answer:

- ``other_query``: the real answer to a different query (in the same language when there is one, so the
  language alone does not give it away);
- ``truncated``: the answer cut to its first fifth (characters);
- ``wrong_language``: the answer to the same query's twin in the other language (``twin`` in
  ``data/queries``), or else another query's answer in another language;
- ``prompt_echo``: the kit's own prompt text (the instructions its pipelines give the answering model), as a
  model that only echoes its prompt would answer;
- ``empty``: an empty answer;
- ``fact_changed`` (the subtle kind): the real answer with one key fact changed to a plausible wrong one,
  written by a model told to change that fact and keep everything else (:func:`fact_changed_pairs`), and kept
  only where the fact is no longer stated (its surface forms in both languages are gone: a check of the
  evaluation, never shown to anyone) and the rest is still the real answer's length. A judge that cannot tell
  a wrong fact from a right one fails here, where the gross kinds above let it pass.

Each pair (real, planted) is judged in both orders. **Gate accuracy** = the share of pairs in which the judge,
its two orders averaged, more likely than not prefers the real answer: the real answer's probability averaged
over both judgments is above 0.5 (a verdict without probabilities counts as certain, so then the real answer
must win in *both* orders: a tie or one wrong order fails the pair). This is the same averaging as the quality
verdicts the gate licenses (``retention.query_score``). Below the threshold (0.9) the judge cannot judge and
no quality verdict may be shown. The share of pairs won in both orders (``both_orders_accuracy``), the
per-judgment accuracy and the accuracy of each kind are reported beside it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Sequence

from .retention import first_position_rate, judgment_outcome, outcome_probabilities

KINDS = ("other_query", "truncated", "wrong_language", "prompt_echo", "empty")
SUBTLE_KINDS = ("fact_changed",)  # built by a model (async), not from the answers alone
ALL_KINDS = KINDS + SUBTLE_KINDS
GATE_THRESHOLD = 0.9
REAL, PLANTED = "real", "planted"


@dataclass(frozen=True)
class RealAnswer:
    """A real, complete answer (the baseline's) to one query."""

    query_id: str
    query: str
    text: str
    lang: str = ""
    twin: str | None = None  # the id of the same query in the other language, if the data has one
    facts: tuple[Any, ...] = ()  # the query's reference key facts (``data/queries``), for ``fact_changed``


@dataclass(frozen=True)
class GatePair:
    query_id: str
    query: str
    kind: str
    real: str
    planted: str
    source: str | None = None  # where the planted answer came from (a query id), if from another answer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_echoes() -> list[str]:
    """The kit's own prompt texts, as the answering model was given them (system prompt and each stage's
    task): what a model that only repeats its prompt shows the user."""
    from ..pipeline import SYSTEM_PROMPT, preset

    return [f"{SYSTEM_PROMPT}\n\nYour task: {stage.instruction}" for stage in preset("staged")]


def planted_pairs(answers: Sequence[RealAnswer], *, kinds: Iterable[str] = KINDS, seed: int = 0,
                  echoes: Sequence[str] | None = None) -> list[GatePair]:
    """One planted bad answer of each kind for each real answer (a kind that cannot be built for an answer,
    e.g. ``other_query`` with a single answer, is left out for it). Deterministic for a seed."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown gate kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    echoes = list(echoes) if echoes is not None else prompt_echoes()
    rng = random.Random(seed)
    by_id = {a.query_id: a for a in answers}
    pairs: list[GatePair] = []
    for i, real in enumerate(answers):
        others = [a for a in answers if a.query_id != real.query_id and a.text.strip() != real.text.strip()]
        same_lang = [a for a in others if a.lang == real.lang and a.query_id != real.twin]
        other_lang = [a for a in others if a.lang != real.lang]
        for kind in kinds:
            planted: str | None = None
            source: str | None = None
            if kind == "other_query":
                pool = same_lang or [a for a in others if a.query_id != real.twin]
                if pool:
                    pick = pool[rng.randrange(len(pool))]
                    planted, source = pick.text, pick.query_id
            elif kind == "truncated":
                cut = real.text[: len(real.text) // 5]
                if cut.strip() and cut != real.text:
                    planted = cut
                elif len(real.text) >= 2:
                    planted = real.text[:1]
            elif kind == "wrong_language":
                twin = by_id.get(real.twin) if real.twin else None
                if twin is not None and twin.lang != real.lang:
                    planted, source = twin.text, twin.query_id
                elif other_lang:
                    pick = other_lang[rng.randrange(len(other_lang))]
                    planted, source = pick.text, pick.query_id
            elif kind == "prompt_echo":
                if echoes:
                    planted = echoes[i % len(echoes)]
            elif kind == "empty":
                planted = ""
            if planted is not None:
                pairs.append(GatePair(query_id=real.query_id, query=real.query, kind=kind, real=real.text,
                                      planted=planted, source=source))
    return pairs


# The generator's task. The fact to change is named (in the answer's language) so that the change is one the
# reference can catch; the rest must stay as written, so that only the fact tells the two answers apart.
FACT_CHANGE_SYSTEM = "You edit texts exactly as asked and reply with the edited text only."
FACT_CHANGE_TASK = (
    "Below, as JSON data, are an answer, one fact it states and the words of the answer that state it. Rewrite the "
    "answer so that this fact becomes wrong: replace those words with a plausible but false alternative (another "
    "name, number, date or reason), and keep every other sentence exactly as it is, in the same language. Do not "
    "say that anything was changed. Reply with JSON: {\"answer\": the rewritten answer}."
)
# the reply as structured output, so that the rewrite is read from one field (see reports/judge/)
FACT_CHANGE_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"answer": {"type": "string"}},
                                      "required": ["answer"]}
FACT_CHANGE_TOKENS_MARGIN = 48  # the rewrite may be a little longer than the answer


def fact_change_messages(answer: str, fact: str, words: Sequence[str] = ()) -> list[dict[str, str]]:
    import json

    data = json.dumps({"answer": answer, "fact_to_make_wrong": fact, "words_to_replace": list(words)},
                      ensure_ascii=False, indent=1)
    return [{"role": "system", "content": FACT_CHANGE_SYSTEM},
            {"role": "user", "content": f"{FACT_CHANGE_TASK}\n\n```json\n{data}\n```"}]


def fact_change_problem(real: str, planted: str, fact: Any) -> str | None:
    """Why a model's rewrite is not a usable ``fact_changed`` answer, or None. Evaluation only: the rewrite must
    differ from the real answer, no longer state the fact (none of its forms, in either language, is found),
    and keep the real answer's size (between half and twice its characters: an edit, not another answer)."""
    from .facts import recalled

    text = planted.strip()
    if not text or text == real.strip():
        return "the rewrite is empty or unchanged"
    if recalled(text, fact):
        return "the rewrite still states the fact"
    if not 0.5 <= len(text) / max(1, len(real.strip())) <= 2.0:
        return "the rewrite is not an edit of the answer (its length changed too much)"
    return None


def _stating_words(text: str, fact: Any) -> list[str]:
    """The fact's surface forms (``any``) that occur in ``text``: the words the rewrite must replace."""
    from .facts import recalled

    return [str(f).rstrip("*") for f in fact.get("any", []) if str(f).strip() and recalled(text, {"any": [f]})]


async def fact_changed_pairs(backend: Any, answers: Sequence[RealAnswer], *, model: str | None = None,
                             on_rejected: Callable[[RealAnswer, str], Any] | None = None) -> list[GatePair]:
    """One ``fact_changed`` pair per real answer that states one of its query's facts: ``model`` on ``backend``
    rewrites the answer with that fact made wrong (all answers at once: on the embedded engine, one batch), shown
    the words of the answer that state the fact (the fact's surface forms found in it). A rewrite that fails
    :func:`fact_change_problem` is asked for once more, sampled (temperature 0.8; at temperature 0 a small model
    often gives the answer back unchanged, reports/judge/). A second failure is dropped (``on_rejected`` hears
    why), never repaired."""
    import asyncio

    from ..backends import CallRequest
    from ..pipeline import parse_structured
    from .facts import recalled

    async def one(real: RealAnswer) -> GatePair | None:
        fact = next((f for f in real.facts if recalled(real.text, f)), None)
        if fact is None:
            return None
        stated = str(fact.get(real.lang) or fact.get("en") or "")
        words = _stating_words(real.text, fact)
        tokens = max(64, len(real.text) + FACT_CHANGE_TOKENS_MARGIN)  # a Korean character can be a token or two
        for temperature, seed in ((0.0, 0), (0.8, 1)):
            rec = await backend.call(CallRequest(messages=fact_change_messages(real.text, stated, words), model=model,
                                                 max_tokens=tokens, temperature=temperature, seed=seed,
                                                 json_schema=FACT_CHANGE_SCHEMA)).collect()
            written = ""
            if rec.status != "ok":
                problem = rec.error or rec.status
            elif rec.finish_reason == "length":
                problem = "the rewrite was cut by its token limit"
            else:
                value, problem = parse_structured(rec.text, FACT_CHANGE_SCHEMA)
                written = str(value["answer"]).strip() if problem is None else ""
                problem = problem or fact_change_problem(real.text, written, fact)
            if problem is None:
                break
        if problem is not None:
            if on_rejected is not None:
                on_rejected(real, problem)
            return None
        return GatePair(query_id=real.query_id, query=real.query, kind="fact_changed", real=real.text,
                        planted=written, source=f"fact: {stated}")

    return [p for p in await asyncio.gather(*(one(a) for a in answers)) if p is not None]


# --------------------------------------------------------------------------------------- formulas

GATE_OUTCOMES = (REAL, PLANTED, "tie")


def pair_correct(outcomes: Sequence[Any]) -> bool:
    """A pair passes when the real answer's probability, averaged over its judgments (both orders; an
    undecided judgment counts as not preferring it), is above 0.5. Outcomes are verdicts (``"real"``,
    ``"planted"``, ``"tie"``, None) or probabilities over them (:func:`~.retention.judgment_outcome`)."""
    if not outcomes:
        return False
    real = [0.0 if o is None else outcome_probabilities(o, GATE_OUTCOMES)[REAL] for o in outcomes]
    return sum(real) / len(real) > 0.5


@dataclass(frozen=True)
class GateResult:
    accuracy: float | None  # share of pairs with the real answer preferred, both orders averaged (pair_correct)
    judgment_accuracy: float | None  # share of single judgments preferring the real answer
    by_kind: dict[str, float | None]  # pair accuracy per kind
    n_pairs: int
    n_judgments: int
    n_undecided: int
    first_position_rate: float | None  # share of non-tie verdicts for the answer shown first
    threshold: float
    passed: bool  # accuracy >= threshold (False without pairs)
    both_orders_accuracy: float | None = None  # share of pairs with the real answer's verdict in both orders
    judge_model: str = ""
    judge_backend: str = ""
    pairs: list[dict[str, Any]] = field(default_factory=list)  # each pair with its judgments

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.2f}"
        kinds = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in self.by_kind.items())
        verdict = "passes" if self.passed else "FAILS: this judge cannot judge; no quality verdict"
        both = "n/a" if self.both_orders_accuracy is None else f"{self.both_orders_accuracy:.2f}"
        return (f"judge gate ({self.judge_model}): accuracy {acc} over {self.n_pairs} pairs (both orders averaged; "
                f"threshold {self.threshold:g}) -> {verdict}; real answer's verdict in both orders {both}; per kind: "
                f"{kinds}")


def gate_result(judged: Sequence[tuple[GatePair, Sequence[Any]]], *, threshold: float = GATE_THRESHOLD,
                judge_model: str = "", judge_backend: str = "") -> GateResult:
    """The gate's figures from pairs and their judgments (:class:`~.judge.Judgment` objects or their dicts)."""
    def get(j: Any, key: str) -> Any:
        return j.get(key) if isinstance(j, dict) else getattr(j, key)

    correct = [pair_correct([judgment_outcome(j, (REAL, PLANTED)) for j in js]) for _, js in judged]
    both = [bool(js) and all(get(j, "winner") == REAL for j in js) for _, js in judged]
    flat = [j for _, js in judged for j in js]
    by_kind: dict[str, float | None] = {}
    for kind in ALL_KINDS:
        ks = [c for (p, _), c in zip(judged, correct) if p.kind == kind]
        by_kind[kind] = sum(ks) / len(ks) if ks else None
    accuracy = sum(correct) / len(correct) if correct else None
    return GateResult(
        accuracy=accuracy,
        judgment_accuracy=sum(get(j, "winner") == REAL for j in flat) / len(flat) if flat else None,
        by_kind=by_kind, n_pairs=len(judged), n_judgments=len(flat),
        n_undecided=sum(get(j, "winner") is None for j in flat),
        first_position_rate=first_position_rate(get(j, "verdict") for j in flat), threshold=threshold,
        both_orders_accuracy=sum(both) / len(both) if both else None,
        passed=accuracy is not None and accuracy >= threshold, judge_model=judge_model, judge_backend=judge_backend,
        pairs=[{**p.to_dict(), "correct": c, "judgments": [j if isinstance(j, dict) else j.to_dict() for j in js]}
               for (p, js), c in zip(judged, correct)])


async def run_gate(judge: Any, pairs: Sequence[GatePair], *, threshold: float = GATE_THRESHOLD,
                   on_pair: Callable[[GatePair, list[Any]], Awaitable[None] | None] | None = None,
                   done: dict[tuple[str, str], list[Any]] | None = None,
                   references: dict[str, list[str]] | None = None) -> GateResult:
    """Judge every pair in both orders with ``judge`` (a :class:`~llmfirst_kit.quality.judge.PairwiseJudge`),
    reference-guided where ``references`` has the pair's query id.
    ``done`` holds judgments of pairs judged before (key: query id, kind), e.g. read back to resume;
    ``on_pair`` is called with each newly judged pair (to append it to a log)."""
    import inspect

    judged = []
    for pair in pairs:
        known = (done or {}).get((pair.query_id, pair.kind))
        if known is None:
            known = await judge.compare(pair.query, pair.real, pair.planted, labels=(REAL, PLANTED),
                                        reference=references.get(pair.query_id) if references else None)
            if on_pair is not None:
                result = on_pair(pair, known)
                if inspect.isawaitable(result):
                    await result
        judged.append((pair, known))
    return gate_result(judged, threshold=threshold, judge_model=judge.model_name, judge_backend=judge.backend.name)


__all__ = ["ALL_KINDS", "GATE_THRESHOLD", "KINDS", "SUBTLE_KINDS", "GatePair", "GateResult", "RealAnswer",
           "fact_change_messages", "fact_change_problem", "fact_changed_pairs", "gate_result", "pair_correct",
           "planted_pairs", "prompt_echoes", "run_gate"]
