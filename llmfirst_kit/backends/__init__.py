"""Backends stream one model call each; see ``base.Backend`` for the contract."""

from __future__ import annotations

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


__all__ = ["Backend", "CallRequest", "Chunk", "ModelCall", "get_backend", "BACKENDS"]
