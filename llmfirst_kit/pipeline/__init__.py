"""The LLM-first staged pipeline: stages are data (:mod:`.presets`), each stage is one streamed model call
(:mod:`.run`)."""

from .presets import (DEFAULT_STRATEGY, MODIFIERS, PRESET_NAMES, PRESETS, REVIEW_SCHEMA, STRATEGIES, STRATEGY_SCHEMA, SYSTEM_PROMPT,
                      PresetName, Stage, parse_preset, preset, review_stage, revision_stage, rewrite_stage, strategy_stage,
                      with_model)
from .run import Pipeline, Run, parse_structured, structured_retry

__all__ = ["DEFAULT_STRATEGY", "MODIFIERS", "PRESETS", "PRESET_NAMES", "REVIEW_SCHEMA", "STRATEGIES", "STRATEGY_SCHEMA", "SYSTEM_PROMPT",
           "Pipeline", "PresetName", "Run", "Stage", "parse_preset", "parse_structured", "preset",
           "structured_retry", "review_stage",
           "revision_stage", "rewrite_stage", "strategy_stage", "with_model"]
