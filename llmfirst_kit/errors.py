"""Errors the kit raises. Each message names the fix; ``code`` is machine-readable (used by the server)."""

from __future__ import annotations


class KitError(Exception):
    code = "error"


class InvalidInput(KitError, ValueError):
    """Bad input caught before any model call."""

    code = "invalid_input"


class ContextOverflow(InvalidInput):
    code = "context_overflow"


class UnknownModel(InvalidInput, LookupError):
    code = "unknown_model"


class ModelFileError(KitError):
    """A registry model's file is missing or corrupt."""

    code = "model_file"


class BackendUnavailable(KitError):
    """The backend cannot be reached (e.g. no Ollama server)."""

    code = "backend_unavailable"


class QueueFull(KitError):
    """Too many calls already wait for the model (the queue cap, LLMFIRST_MAX_QUEUE / ``serve --max-queue``);
    refused before the call takes a thread or a place in the queue. The servers answer 503."""

    code = "queue_full"


class BackendError(KitError):
    """The backend failed during a call; the record keeps the text produced so far."""

    code = "backend_error"
