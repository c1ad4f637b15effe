"""The one contract every backend implements: stream one model call.

A backend has two steps:

- ``prepare(request)``: everything that must happen before the request is issued (validate the input,
  load the model, build and count the prompt). Errors here cost no model call.
- ``generate(prepared, record)``: an async iterator of :class:`Chunk`, each stamped with
  ``time.perf_counter_ns()`` at arrival; on completion it fills the record's statistics (exact token
  counts, finish reason, server timings).

:class:`ModelCall` wraps the two: it stamps the request start between them, appends every chunk to the
:class:`~llmfirst_kit.records.CallRecord`, and marks the record ``ok``, ``cancelled`` or ``error`` --
keeping whatever text arrived before a failure.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, ClassVar

from ..errors import InvalidInput
from ..records import CallRecord, new_id
from .schema_guard import schema_problem as bounded_schema_problem


@dataclass
class CallRequest:
    messages: list[dict[str, str]]
    model: str | None = None  # None: the backend's default
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None  # structured output: the answer must match this schema
    # a choice among a few options, read from the next-token probabilities after one prefill (no decoding);
    # the call's text is the most probable option; backends with capabilities.next_token_choice only. Each
    # option is read by its first token as written: after a reply_prefix that ends in a word, give the options
    # their leading space (" simple"), as the reply would go on (without it the 0.5B's strategy choice looked
    # informative by accident, reading tokens it would not write)
    choices: list[str] | None = None
    # the model's reply continues from this text (a prefill of the assistant's turn, not shown as output): e.g.
    # the judge's own reasons, so that a choice read after them is conditioned on them; embedded backend only
    reply_prefix: str = ""
    cache: str = "reuse"  # reuse: keep the matching prompt prefix in the KV cache; cold: evaluate all
    num_ctx: int | None = None

    def validate(self) -> None:
        if not self.messages:
            raise InvalidInput("no messages to send; give at least one user message")
        last = self.messages[-1].get("content", "")
        if not isinstance(last, str) or not last.strip():
            raise InvalidInput("the question is empty; pass a non-empty question")
        for i, message in enumerate(self.messages):
            text = message.get("content", "")
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:  # e.g. a lone surrogate ("\ud800") sent as a JSON escape
                    raise InvalidInput(f"message {i} holds text that is not valid Unicode ({text[exc.start:exc.end]!r} "
                                       f"at character {exc.start}, a lone surrogate); send valid UTF-8 text") from None
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidInput(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.cache not in ("reuse", "cold"):
            raise InvalidInput(f"cache must be 'reuse' or 'cold', got {self.cache!r}")
        if self.choices is not None:
            if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices) or not all(
                    isinstance(c, str) and c.strip() for c in self.choices):
                raise InvalidInput(f"choices must be two or more different non-empty strings, got {self.choices!r}")
            if self.json_schema is not None:
                raise InvalidInput("a call is either a choice (choices) or structured output (json_schema), not both")

    def params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed,
            "top_k": self.top_k, "top_p": self.top_p, "stop": list(self.stop), "cache": self.cache,
            "structured": self.json_schema is not None, "num_ctx": self.num_ctx,
            **({"choices": list(self.choices)} if self.choices else {}),
            **({"reply_prefix_chars": len(self.reply_prefix)} if self.reply_prefix else {}),
        }


@dataclass(frozen=True)
class Chunk:
    text: str
    t_ns: int  # time.perf_counter_ns() at arrival
    tokens: int | None = None  # output tokens this chunk carries, when the backend knows


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; read by the pipeline, the studies, the server and the benches."""

    structured_output: bool  # JSON-schema constrained output (the pipeline's decisions, the judge)
    cold_cache: bool  # honours cache="cold": evaluates the whole prompt again on request
    local_model_files: bool  # models are files on this machine: sha256, NAME@TYPE variants, perplexity/KL
    in_process: bool  # decodes in this process: shares its cores; a model load is paid by a call here
    server_timings: bool  # the server reports its own timings (load, prompt eval, decode) per call
    context_per_call: bool  # the context size (num_ctx) can be set per call
    next_token_choice: bool  # a choice among options from next-token probabilities, one prefill, no decoding


@dataclass(frozen=True)
class LoadedModelInfo:
    """A model loaded in this process and its batch: what a server's ``/api/ps`` lists."""

    name: str
    path: str
    sha256: str
    metadata: dict[str, str]
    n_ctx: int  # the most one call may hold
    parallel: int  # sequences decoded at once
    active: int  # sequences decoding now
    waiting: int  # calls waiting for a sequence


class Backend(ABC):
    name: str = ""  # its key in ``registry.REGISTRY``

    capabilities: ClassVar[Capabilities]  # what it can do: its registry entry's (``registry.spec(name)``)

    def call(self, request: CallRequest, *, call_id: str | None = None) -> "ModelCall":
        return ModelCall(self, request, call_id=call_id)

    @abstractmethod
    async def prepare(self, request: CallRequest) -> Any:
        """Validate and get ready; returns whatever ``generate`` needs. Sets nothing on a record."""

    @abstractmethod
    def generate(self, prepared: Any, record: CallRecord) -> AsyncIterator[Chunk]:
        """Issue the call and yield its chunks; fill the record's statistics at the end."""

    @property
    def location(self) -> str:
        """Where its calls go: a server's URL, or ``in-process``."""
        return "in-process"

    def environment(self) -> dict[str, Any]:
        """What this backend's numbers depend on beyond the model (the embedded engine's configuration);
        recorded in every run record."""
        return {}

    @abstractmethod
    def resolve_model(self, model: str | None) -> str:
        """The model's canonical name (raises UnknownModel / BackendUnavailable with the fix)."""

    async def aclose(self) -> None:
        """Release connections (the Ollama client); nothing to do for in-process backends."""

    def model_identity(self, model: str | None) -> str | None:
        """What identifies ``model``'s weights and the engine that runs them, for results kept on disk across
        processes (a choice's calibration prior); None when unknown here (then nothing is kept on disk)."""
        return None

    def structured_output_problem(self, model: str | None) -> str | None:
        """Why ``model`` cannot return JSON-schema output, or None if it can."""
        return None

    #: the context a call gets when it asks for none (an in-process engine's); None: the server decides
    default_n_ctx: int | None = None

    def schema_problem(self, schema: dict[str, Any], model: str | None, n_ctx: int | None = None) -> str | None:
        """Why this client's JSON schema cannot constrain ``model``'s output here, or None. The default runs the
        cheap, bounded checks every backend needs (:func:`~.schema_guard.schema_problem`); an engine that
        builds grammars adds its own."""
        return bounded_schema_problem(schema)

    def prompt_tokens(self, messages: list[dict[str, str]], model: str | None, n_ctx: int | None = None
                      ) -> int | None:
        """How many tokens ``messages`` take as ``model``'s prompt here, or None when only a server knows."""
        return None

    def empty_caches(self) -> bool:
        """Empty the KV cache of every model this backend holds here (a benchmark's "cold per run"); False when
        its models are elsewhere (a server's cache cannot be emptied from here)."""
        return False

    def grammars_built(self) -> int:
        """How many JSON-schema grammars this backend has built so far (first-run costs); 0 if it builds none."""
        return 0

    def loaded(self) -> list[LoadedModelInfo]:
        """The models this backend holds in this process's memory (a server's /api/ps); none when its models
        are elsewhere."""
        return []

    def model_metadata(self, model: str) -> dict[str, str]:
        """The model file's key-value metadata (GGUF keys), or {} when only a server has the file."""
        return {}


class ModelCall:
    """One model call: ``async for chunk in call`` streams it; ``call.record`` holds what happened.

    Leaving the ``async for`` early, or cancelling the task that runs it, stops the generation (the
    embedded backend stops decoding within one token step). Iterate once.
    """

    def __init__(self, backend: Backend, request: CallRequest, *, call_id: str | None = None):
        self.backend = backend
        self.request = request
        self.record = CallRecord(call_id=call_id or new_id("call"), backend=backend.name,
                                 model=request.model or "", params=request.params())
        self._started = False

    def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._started:
            raise RuntimeError("a ModelCall streams once; make a new call to stream again")
        self._started = True
        # The generator is not stored on self: leaving `async for` early drops the last reference, so the
        # event loop finalises it at once (running its `finally`, which stops the generation).
        return self._stream()

    async def _stream(self) -> AsyncIterator[Chunk]:
        rec = self.record
        try:
            self.request.validate()
            prepared = await self.backend.prepare(self.request)
            rec.model = getattr(prepared, "model_name", rec.model) or rec.model
            rec.start_ns = time.perf_counter_ns()
            async for chunk in self.backend.generate(prepared, rec):
                if not chunk.text:
                    continue
                rec.chunk_ns.append(chunk.t_ns)
                rec.chunk_tokens.append(chunk.tokens if chunk.tokens is not None else 1)
                rec.text += chunk.text
                yield chunk
            rec.status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            self._mark_cancelled()
            raise
        except Exception as exc:
            rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
            rec.finish_reason = rec.finish_reason or "error"
            raise
        finally:
            rec.end_ns = time.perf_counter_ns()

    def _mark_cancelled(self) -> None:
        rec = self.record
        rec.status, rec.finish_reason = "cancelled", "cancelled"
        if rec.output_tokens is None:
            rec.output_tokens = sum(rec.chunk_tokens)
            rec.token_count_source = rec.token_count_source or "chunks delivered before cancel"

    async def collect(self) -> CallRecord:
        """Stream to the end without a consumer; returns the record."""
        async for _ in self:
            pass
        return self.record
