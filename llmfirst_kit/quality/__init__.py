"""Answer quality against a baseline system, judged so that the verdict can fail.

Reading order: ``judge`` (a model compares two answers to one query, in both orders, structured verdict) ->
``gate`` (the judge must first tell real answers from planted bad ones: below 0.9 no verdict) ->
``retention`` (pure formulas: win-or-tie share, bootstrap interval, order disagreement, meets quality) ->
``facts`` (key-fact recall against the reference facts in ``data/queries``, beside the judge).

Objective fidelity of quantized files (perplexity, KL) is ``llmfirst_kit.models.fidelity``.
"""

from .facts import key_fact_recall
from .gate import GATE_THRESHOLD, KINDS, GatePair, GateResult, RealAnswer, gate_result, planted_pairs, run_gate
from .judge import VERDICT_SCHEMA, Judgment, PairwiseJudge
from .retention import QUALITY_TARGET, Retention, bootstrap_ci, order_disagreement, query_score, retention

__all__ = ["GATE_THRESHOLD", "KINDS", "QUALITY_TARGET", "VERDICT_SCHEMA", "GatePair", "GateResult", "Judgment",
           "PairwiseJudge", "RealAnswer", "Retention", "bootstrap_ci", "gate_result", "key_fact_recall",
           "order_disagreement", "planted_pairs", "query_score", "retention", "run_gate"]
