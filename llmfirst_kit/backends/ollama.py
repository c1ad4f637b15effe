"""Ollama backend: stream one ``/api/chat`` call through the official ``ollama.AsyncClient``.

What the record gets:

- chunks stamped with ``time.perf_counter_ns()`` as each NDJSON part arrives (after the client has parsed
  the line; nothing else runs in between);
- exact token counts from the server's final part (``prompt_eval_count``, ``eval_count``) and its
  timings in ns, as given (``load_duration``, ``prompt_eval_duration``, ``eval_duration``,
  ``total_duration``);
- ``cold_load`` when ``load_duration`` shows that this call paid for loading the model.

Every failure becomes one of the kit's errors and names the fix; text streamed before a failure stays in
the record (``ModelCall`` keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
import ollama
from ollama._client import _parse_host  # the client's own host rules, so our messages name the real URL

from ..errors import BackendError, BackendUnavailable, InvalidInput, KitError, UnknownModel
from ..records import CallRecord
from ._remote import connect_timeout_fix, httpx_timeout, read_timeout_fix, timeouts
from .base import Backend, CallRequest, Chunk

DEFAULT_OLLAMA_MODEL = "qwen2.5:0.5b"

# A warm call reports a load_duration of a few milliseconds (Ollama only checks that the runner is up);
# loading even a 0.5B model from disk takes several hundred ms or more. 0.5 s separates the two.
COLD_LOAD_THRESHOLD_S = 0.5

NS = 1e9


@dataclass
class OllamaPrepared:
    model_name: str
    messages: list[dict[str, str]]
    options: dict[str, Any] = field(default_factory=dict)
    format: dict[str, Any] | None = None


def chat_options(request: CallRequest) -> dict[str, Any]:
    """The request's sampling settings as Ollama ``options``; unset ones are left to the server."""
    options = {
        "num_predict": request.max_tokens, "temperature": request.temperature, "seed": request.seed,
        "top_k": request.top_k, "top_p": request.top_p, "stop": list(request.stop) or None,
        "num_ctx": request.num_ctx,
    }
    return {k: v for k, v in options.items() if v is not None}


class OllamaBackend(Backend):
    """Stream from a model served by Ollama (``ollama serve``).

    ``timeout``: the longest wait in seconds for the server's next bytes (read timeout; default
    ``$LLMFIRST_READ_TIMEOUT``, else 300; 0: none); ``connect_timeout``: for the connection (default
    ``$LLMFIRST_CONNECT_TIMEOUT``, else 10). See :mod:`llmfirst_kit.backends._remote`."""

    name = "ollama"

    def __init__(self, model: str | None = None, *, host: str | None = None, timeout: float | None = None,
                 connect_timeout: float | None = None):
        self.default_model = model or DEFAULT_OLLAMA_MODEL
        self.host = _parse_host(host or os.getenv("OLLAMA_HOST"))
        self.timeout, self.connect_timeout = timeouts(timeout, connect_timeout)
        self._client: ollama.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def resolve_model(self, model: str | None) -> str:
        return model or self.default_model

    def client(self) -> ollama.AsyncClient:
        """One client per event loop: httpx's pooled connections belong to the loop that opened them, and
        sync helpers (``asyncio.run`` per call) run every call on a new loop."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = ollama.AsyncClient(host=self.host, timeout=httpx_timeout(self.timeout, self.connect_timeout))
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = self._client_loop = None

    async def prepare(self, request: CallRequest) -> OllamaPrepared:
        """No network call: a missing model surfaces on the chat call itself (HTTP 404)."""
        if request.cache == "cold":
            raise InvalidInput("Ollama has no per-request switch to evaluate a prompt without its KV cache; "
                               "use cache='reuse' with the ollama backend, or the embedded backend for cold runs")
        return OllamaPrepared(model_name=self.resolve_model(request.model), messages=list(request.messages),
                              options=chat_options(request), format=request.json_schema)

    async def generate(self, prepared: OllamaPrepared, record: CallRecord) -> AsyncIterator[Chunk]:
        model = prepared.model_name
        record.model_info = {"host": self.host}
        stream: Any = None
        chunks = 0
        done = False
        try:
            stream = await self.client().chat(model=model, messages=prepared.messages, stream=True,
                                              options=prepared.options, format=prepared.format)
            async for part in stream:
                t_ns = time.perf_counter_ns()  # first thing on arrival
                text = part.message.content or ""
                if text:
                    chunks += 1
                    # Ollama streams one token per part (it may hold back a token that ends inside a UTF-8
                    # character or could start a stop string); the exact total is eval_count at the end.
                    yield Chunk(text=text, t_ns=t_ns, tokens=1)
                if part.done:
                    done = True
                    fill_stats(record, part, chunks)
        except KitError:
            raise
        except Exception as exc:
            raise self._translate(exc, model) from exc
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # early exit or cancel: closing the connection stops the generation
        if not done:
            raise BackendError(f"the Ollama stream from {self.host} ended without its final statistics "
                               f"(done=true); the server may have stopped; check the `ollama serve` log")

    def _translate(self, exc: BaseException, model: str) -> KitError:
        """An ollama/httpx exception -> the kit's error, naming the fix."""
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendUnavailable(f"Ollama at {self.host} did not accept a connection within "
                                      f"{self.connect_timeout} s; check that `ollama serve` runs there (or set "
                                      f"OLLAMA_HOST), or {connect_timeout_fix('OllamaBackend')}")
        if isinstance(exc, httpx.TimeoutException):  # read, write or pool: the server went silent
            return BackendError(f"no answer from Ollama at {self.host} within {self.timeout} s; "
                                f"{read_timeout_fix('OllamaBackend')}; the text streamed so far is kept")
        if isinstance(exc, (httpx.ConnectError, ConnectionError)):
            # streaming requests raise httpx.ConnectError; the client's plain requests raise ConnectionError
            return BackendUnavailable(f"Ollama not reachable at {self.host}; start it with `ollama serve` "
                                      f"or set OLLAMA_HOST")
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404:
                return UnknownModel(f"model {model!r} not found on the Ollama server at {self.host}; "
                                    f"run: ollama pull {model}")
            if exc.status_code == -1:  # an {"error": ...} line inside the NDJSON stream
                return BackendError(f"Ollama failed during the call: {exc.error}; the text streamed so far is "
                                    f"kept; check the `ollama serve` log")
            return BackendError(f"Ollama answered HTTP {exc.status_code}: {exc.error}")
        if isinstance(exc, (httpx.HTTPError, json.JSONDecodeError)):
            return BackendError(f"the connection to Ollama at {self.host} failed mid-answer "
                                f"({type(exc).__name__}: {exc}); check the `ollama serve` log")
        return BackendError(f"Ollama call failed: {type(exc).__name__}: {exc}")

    async def list_models(self) -> list[dict[str, Any]]:
        """The models the server has pulled (``GET /api/tags``), as plain dicts."""
        try:
            listing = await self.client().list()
        except Exception as exc:
            raise self._translate(exc, "") from exc
        return [m.model_dump(mode="json") for m in listing.models]

    async def version(self) -> str:
        """The server's version (``GET /api/version``; the client has no public method for it)."""
        try:
            response = await self.client()._request_raw("GET", "/api/version")
            return str(response.json()["version"])
        except Exception as exc:
            raise self._translate(exc, "") from exc


def fill_stats(record: CallRecord, final: ollama.ChatResponse, chunks: int) -> None:
    """Copy the final part's counts and timings (ns, as given) into the record."""
    record.prompt_tokens = final.prompt_eval_count
    if final.eval_count is not None:
        # eval_count is every generated token, including a thinking model's hidden reasoning
        record.output_tokens = final.eval_count
        record.token_count_source = "ollama eval_count (server)"
    else:
        record.output_tokens = chunks
        record.token_count_source = "content chunks (server gave no eval_count; ~one token per chunk)"
    record.finish_reason = final.done_reason
    record.server = {
        "load_duration": final.load_duration, "prompt_eval_duration": final.prompt_eval_duration,
        "eval_duration": final.eval_duration, "total_duration": final.total_duration,
        "prompt_eval_count": final.prompt_eval_count, "eval_count": final.eval_count,
    }
    if final.load_duration is not None:
        record.load_s = final.load_duration / NS
        record.cold_load = record.load_s > COLD_LOAD_THRESHOLD_S
