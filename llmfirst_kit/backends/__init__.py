"""Backends stream one model call each; see ``base.Backend`` for the contract and ``registry`` for the
table of backends (names, typed arguments, capabilities)."""

from __future__ import annotations

from .base import Backend, CallRequest, Capabilities, Chunk, LoadedModelInfo, ModelCall
from .registry import (BACKENDS, DEFAULT_BACKEND, backend_options, capabilities, check_options,
                       get_backend)

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "CallRequest", "Capabilities", "Chunk", "LoadedModelInfo",
           "ModelCall",
           "backend_options", "capabilities", "check_options", "get_backend"]
