"""Every ``LLMFIRST_*`` environment variable, in one pydantic-settings model: ``LLMFIRST_`` + a field's name in
capitals. :class:`Settings` holds what the whole kit reads; the server's :class:`~.serve.config.ServerConfig`
extends it with what only a server has (``LLMFIRST_TOKEN``, ``LLMFIRST_IDLE_TIMEOUT_S``, ...).

The environment is read when :func:`settings` is called (a notebook or a test may change it between calls), and a
value that does not fit is refused with :class:`~.errors.InvalidInput` naming the variable, what it takes and how
to fix it. (``LLMFIRST_ENGINE_PROBE_FAKE_CRASH`` is not a setting: a test's fault injection for the engine probe's
child process, ``engine.FAKE_CRASH_ENV``.)"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import InvalidInput

ENV_PREFIX = "LLMFIRST_"
# Sequences decoded together per model (llama.cpp server's --parallel, Ollama's OLLAMA_NUM_PARALLEL), chosen by
# measurement on 2-core machines: at 8 a step can pass the paper's 100 ms (reports/benchmarks-2026-12.md).
DEFAULT_PARALLEL = 4
DEFAULT_MAX_QUEUE = 64  # calls that may wait for one model (Ollama's OLLAMA_MAX_QUEUE is alike, 512 by default)


class Settings(BaseSettings):
    """What the kit reads from ``LLMFIRST_*``; an argument given in code (e.g. ``EmbeddedBackend(parallel=8)``)
    wins over the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", env_parse_none_str="none",
                                      env_ignore_empty=True, frozen=True)

    cache: Path = Field(default_factory=lambda: Path.home() / ".cache" / "llmfirst_kit",
                        description="the kit's cache: model files, engine verdicts, calibration priors",
                        json_schema_extra={"takes": "a directory path"})
    engine: Literal["auto", "safe", "fast"] = Field("auto", description="the engine's extra buffers (auto probes the "
                                                    "machine)", json_schema_extra={"takes": "one of: auto, safe, fast"})
    parallel: int = Field(DEFAULT_PARALLEL, ge=1, description="how many calls a model decodes at once",
                          json_schema_extra={"takes": "a whole number of at least 1 (e.g. 4)"})
    max_queue: int = Field(DEFAULT_MAX_QUEUE, ge=0,
                           description="how many calls may wait for a model; one more is refused",
                           json_schema_extra={"takes": "a whole number (e.g. 64)"})
    read_timeout: float = Field(300.0, ge=0, description="how long to wait for a server's next bytes",
                                json_schema_extra={"takes": "a number of seconds (e.g. 300; 0: no limit)"})
    connect_timeout: float = Field(10.0, ge=0, description="how long to wait for a connection to a server",
                                   json_schema_extra={"takes": "a number of seconds (e.g. 10; 0: no limit)"})

    @field_validator("engine", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    def __init__(self, **values: Any) -> None:
        # None for one of these fields means "not given": the environment, else the default
        values = {k: v for k, v in values.items() if v is not None or k not in Settings.model_fields}
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidInput(describe_settings_error(type(self), exc, values)) from None


def settings() -> Settings:
    """The kit's settings from the environment as it is now. Built once per distinct environment (every model
    call resolves its file through the cache directory: building the model each time cost ~0.2 ms)."""
    return _settings_for(tuple(sorted((k, v) for k, v in os.environ.items()
                                      if k.startswith(ENV_PREFIX) or k == "HOME")))


@functools.lru_cache(maxsize=16)
def _settings_for(environment: tuple[tuple[str, str], ...]) -> Settings:
    return Settings()


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def describe_settings_error(model: type[BaseSettings], exc: ValidationError, given: dict[str, Any]) -> str:
    """A settings error naming where each value came from (an argument or an environment variable), what the
    field takes and the fix."""
    fields = model.model_fields
    parts = []
    for err in exc.errors()[:3]:
        name = str(err["loc"][0]) if err["loc"] else ""
        if name not in fields:
            parts.append(f"unknown setting {name!r}; {model.__name__} takes: {', '.join(fields)}")
            continue
        field = fields[name]
        extra = field.json_schema_extra
        takes = extra.get("takes") if isinstance(extra, dict) else None
        env = env_name(name)
        from_env = name not in given and env in os.environ
        source = f"{env}={os.environ[env]!r}" if from_env else f"{name}={err.get('input')!r}"
        what = f"{takes} ({err['msg']})" if takes else f"accepted ({err['msg']})"
        parts.append(f"{source} is not {what}; it sets {field.description}" + ("; change it, or unset it"
                                                                                  if from_env else ""))
    return "settings: " + "; ".join(parts)
