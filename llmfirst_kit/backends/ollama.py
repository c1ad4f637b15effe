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

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import ollama
from ollama._client import _parse_host  # the client's own host rules, so our messages name the real URL

from ..errors import BackendError, BackendUnavailable, KitError, UnknownModel
from ..records import CallRecord
from ._remote import RemoteBackend, StreamTally, connect_timeout_fix, httpx_timeout, read_timeout_fix
from .base import CallRequest, Chunk
from .registry import spec

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


class OllamaBackend(RemoteBackend):
    """Stream from a model served by Ollama (``ollama serve``).

    ``timeout``: the longest wait in seconds for the server's next bytes (read timeout; default
    ``$LLMFIRST_READ_TIMEOUT``, else 300; 0: none); ``connect_timeout``: for the connection (default
    ``$LLMFIRST_CONNECT_TIMEOUT``, else 10). See :mod:`llmfirst_kit.backends._remote`."""

    name = "ollama"
    capabilities = spec("ollama").capabilities
    cold_cache_refusal = ("Ollama has no per-request switch to evaluate a prompt without its KV cache; "
                          "use cache='reuse' with the ollama backend, or the embedded backend for cold runs")

    @property
    def location(self) -> str:
        return self.host

    def __init__(self, model: str | None = None, *, host: str | None = None, timeout: float | None = None,
                 connect_timeout: float | None = None):
        super().__init__(timeout=timeout, connect_timeout=connect_timeout)
        self.default_model = model or DEFAULT_OLLAMA_MODEL
        self.host = _parse_host(host or os.getenv("OLLAMA_HOST"))

    def resolve_model(self, model: str | None) -> str:
        return model or self.default_model

    def new_client(self) -> ollama.AsyncClient:
        return ollama.AsyncClient(host=self.host, timeout=httpx_timeout(self.timeout, self.connect_timeout))

    async def prepare(self, request: CallRequest) -> OllamaPrepared:
        """No network call: a missing model surfaces on the chat call itself (HTTP 404)."""
        self.check_request(request)
        return OllamaPrepared(model_name=self.resolve_model(request.model), messages=list(request.messages),
                              options=chat_options(request), format=request.json_schema)

    async def open_stream(self, prepared: OllamaPrepared, record: CallRecord) -> Any:
        record.model_info = {"host": self.host}
        return await self.client().chat(model=prepared.model_name, messages=prepared.messages, stream=True,
                                        options=prepared.options, format=prepared.format)

    def read_part(self, part: Any, t_ns: int, tally: StreamTally, record: CallRecord) -> Iterator[Chunk]:
        text = part.message.content or ""
        if text:
            tally.chunks += 1
            # Ollama streams one token per part (it may hold back a token that ends inside a UTF-8
            # character or could start a stop string); the exact total is eval_count at the end.
            yield Chunk(text=text, t_ns=t_ns, tokens=1)
        if part.done:
            tally.final = part

    def finish(self, prepared: OllamaPrepared, tally: StreamTally, record: CallRecord) -> None:
        if tally.final is None:
            raise BackendError(f"the Ollama stream from {self.host} ended without its final statistics "
                               f"(done=true); the server may have stopped; check the `ollama serve` log")
        fill_stats(record, tally.final, tally.chunks)

    async def close_stream(self, stream: Any) -> None:
        await stream.aclose()

    def translate(self, exc: BaseException, prepared: OllamaPrepared, *, streaming: bool) -> KitError:
        return self._translate(exc, prepared.model_name)

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
