"""Backends stream one model call each; see ``base.Backend`` for the contract."""

from __future__ import annotations

from ..errors import InvalidInput
from .base import Backend, CallRequest, Chunk, ModelCall

BACKENDS = ("embedded", "ollama")


def get_backend(name: str = "embedded", **options) -> Backend:
    """A backend by name: ``embedded`` (llama-cpp-python, the default) or ``ollama``."""
    if name == "embedded":
        from .embedded import EmbeddedBackend

        return EmbeddedBackend(**options)
    if name == "ollama":
        from .ollama import OllamaBackend

        return OllamaBackend(**options)
    raise InvalidInput(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


__all__ = ["Backend", "CallRequest", "Chunk", "ModelCall", "get_backend", "BACKENDS"]
