"""Every backend in one table: its name, its typed arguments and what it can do.

Code outside ``backends/`` never compares a backend's name: it asks :func:`capabilities` (``"does this
backend's model live in files here?"``) or builds the backend from this registry (:func:`get_backend`,
:func:`backend_options`). A new backend is one :class:`BackendSpec` here and one module.

Arguments are checked by a pydantic model per backend before the backend is imported, so a wrong name or
type fails with the list of what that backend accepts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import InvalidInput

from .base import Backend, Capabilities


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None


class EmbeddedOptions(_Options):
    """llama-cpp-python in this process."""

    n_ctx: int = 4096
    n_threads: int | None = None
    max_queue: int | None = None
    parallel: int | None = None


class OllamaOptions(_Options):
    """An Ollama server through the official client."""

    host: str | None = None
    timeout: float | None = None
    connect_timeout: float | None = None


class OpenAIOptions(_Options):
    """Any OpenAI-compatible server (vLLM, SGLang, llama-server, llama-cpp-python's server)."""

    base_url: str | None = None
    api_key: str | None = None
    timeout: float | None = None
    connect_timeout: float | None = None
    response_format_style: Literal["json_schema", "json_object"] = "json_schema"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class", imported only when the backend is built
    options: type[_Options]
    capabilities: Capabilities
    summary: str

    def cls(self) -> type[Backend]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("embedded", "llmfirst_kit.backends.embedded:EmbeddedBackend", EmbeddedOptions,
                Capabilities(structured_output=True, cold_cache=True, local_model_files=True, in_process=True,
                             server_timings=False, context_per_call=True, next_token_choice=True),
                "llama-cpp-python in this process (the default; no server)"),
    BackendSpec("ollama", "llmfirst_kit.backends.ollama:OllamaBackend", OllamaOptions,
                Capabilities(structured_output=True, cold_cache=False, local_model_files=False, in_process=False,
                             server_timings=True, context_per_call=True, next_token_choice=False),
                "an Ollama server (`ollama serve`, or the kit's own `llmfirst serve`)"),
    BackendSpec("openai", "llmfirst_kit.backends.openai:OpenAIBackend", OpenAIOptions,
                Capabilities(structured_output=True, cold_cache=False, local_model_files=False, in_process=False,
                             server_timings=False, context_per_call=False, next_token_choice=False),
                "any OpenAI-compatible server (vLLM, SGLang, llama-server, llama-cpp-python's server)"),
)}

BACKENDS: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_BACKEND = "embedded"


def spec(name: str) -> BackendSpec:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def capabilities(name: str) -> Capabilities:
    """What backend ``name`` can do (an unknown name: InvalidInput listing the known ones)."""
    return spec(name).capabilities


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against backend ``name``'s arguments; the ones given, as given."""
    s = spec(name)
    try:
        s.options(**options)
    except ValidationError as exc:
        accepted = ", ".join(s.options.model_fields)
        wrong = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"backend {name!r}: {wrong}; it accepts: {accepted}") from None
    return options


def get_backend(name: str = DEFAULT_BACKEND, **options: Any) -> Backend:
    """A backend by name: ``embedded`` (llama-cpp-python, the default), ``ollama`` or ``openai`` (any
    OpenAI-compatible server: vLLM, SGLang, llama-server, llama-cpp-python's server...)."""
    return spec(name).cls()(**check_options(name, options))


def backend_options(name: str, **settings: Any) -> dict[str, Any]:
    """Of ``settings`` (e.g. every command-line flag: ``host``, ``base_url``, ``n_threads``, ...), the ones
    backend ``name`` takes, unset ones left out: ``host`` goes to ollama, ``base_url`` to openai, ``n_threads``
    to embedded."""
    fields = spec(name).options.model_fields
    return {k: v for k, v in settings.items() if k in fields and v is not None}


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "REGISTRY", "BackendSpec", "Capabilities", "backend_options", "capabilities",
           "check_options", "get_backend", "spec"]
