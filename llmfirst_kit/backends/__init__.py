"""Backends stream one model call each; see ``base.Backend`` for the contract."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput
from .base import Backend, CallRequest, Chunk, ModelCall

BACKENDS = ("embedded", "ollama", "openai")


def get_backend(name: str = "embedded", **options) -> Backend:
    """A backend by name: ``embedded`` (llama-cpp-python, the default), ``ollama`` or ``openai`` (any
    OpenAI-compatible server: vLLM, SGLang, llama-server, llama-cpp-python's server...)."""
    if name == "embedded":
        from .embedded import EmbeddedBackend

        return EmbeddedBackend(**options)
    if name == "ollama":
        from .ollama import OllamaBackend

        return OllamaBackend(**options)
    if name == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend(**options)
    raise InvalidInput(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def backend_options(name: str, *, host: str | None = None, base_url: str | None = None,
                    n_threads: int | None = None, response_format_style: str | None = None) -> dict[str, Any]:
    """The settings (e.g. from command-line flags) that apply to backend ``name``, unset ones left out:
    ``host`` for ollama, ``base_url`` and ``response_format_style`` for openai, ``n_threads`` for embedded."""
    given = {"ollama": {"host": host}, "openai": {"base_url": base_url, "response_format_style": response_format_style},
             "embedded": {"n_threads": n_threads}}.get(name, {})
    return {k: v for k, v in given.items() if v is not None}


__all__ = ["Backend", "CallRequest", "Chunk", "ModelCall", "get_backend", "backend_options", "BACKENDS"]
