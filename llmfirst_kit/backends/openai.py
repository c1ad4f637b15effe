"""OpenAI-compatible backend: stream one chat completion through the official ``openai.AsyncOpenAI``.

Any server that speaks the OpenAI chat-completions API works: vLLM (``vllm serve``), SGLang, llama.cpp's
``llama-server``, LM Studio, Ollama's ``/v1`` and llama-cpp-python's server (``python -m llama_cpp.server``).

What the record gets:

- chunks stamped with ``time.perf_counter_ns()`` as each server-sent event arrives (after the client has
  parsed it; nothing else runs in between);
- token counts from the server's ``usage`` (the final chunk, asked for with ``stream_options``), recorded as
  ``"openai usage (server)"``; a server that sends no usage (llama-cpp-python's ignores ``stream_options``)
  gets its content chunks counted instead, and ``token_count_source`` says so;
- the choice's ``finish_reason``; ``model_info`` with the base URL and the model id the server reported;
- the server's own timings where it sends them (:func:`server_timings`), in ``record.server_timings`` beside the
  client's clock, with their source: llama.cpp's ``llama-server`` puts a ``timings`` object (``prompt_n``,
  ``cache_n``, ``prompt_ms``, ``predicted_n``, ``predicted_ms``, ...) in its last chunks; vLLM (started with
  ``--enable-prompt-tokens-details``), SGLang and OpenAI report cached prompt tokens in
  ``usage.prompt_tokens_details.cached_tokens``; a ``metrics`` object in a chunk (per-request metrics some
  vLLM builds add) is kept as sent. llama-cpp-python's server sends none of these, so its calls have
  ``server_timings`` None. No load time: the API reports none.

Every failure becomes one of the kit's errors and names the fix; text streamed before a failure stays in
the record (``ModelCall`` keeps it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import openai
from openai.types import CompletionUsage

from ..errors import BackendError, BackendUnavailable, InvalidInput, KitError, UnknownModel
from ..records import CallRecord
from ._remote import RemoteBackend, StreamTally, connect_timeout_fix, read_timeout_fix, timeout_kind
from .base import CallRequest, Chunk
from .registry import spec

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # vLLM's default
NO_KEY = "not-needed"  # local servers check no key, but the client insists on one

ResponseFormatStyle = Literal["json_schema", "json_object"]
RESPONSE_FORMAT_STYLES: tuple[str, ...] = ("json_schema", "json_object")

START_A_SERVER = ("start one (e.g. `vllm serve MODEL`, or llama-cpp-python's server in this machine's engine "
                  "configuration: `python -m llmfirst_kit.llama_cpp_server --model FILE`) or set OPENAI_BASE_URL")


@dataclass
class OpenAIPrepared:
    model_name: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)


def response_format(schema: dict[str, Any], style: ResponseFormatStyle) -> dict[str, Any]:
    """The ``response_format`` that makes the server follow ``schema``.

    ``json_schema`` is the OpenAI form (vLLM, SGLang, llama-server, LM Studio, Ollama's /v1);
    ``json_object`` with a ``schema`` is the only form llama-cpp-python's server accepts.
    """
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}


def completion_params(request: CallRequest, style: ResponseFormatStyle) -> dict[str, Any]:
    """The request's settings as ``chat.completions.create`` arguments; unset ones are left to the server."""
    params: dict[str, Any] = {
        "max_tokens": request.max_tokens, "temperature": request.temperature, "seed": request.seed,
        "top_p": request.top_p, "stop": list(request.stop) or None,
    }
    params = {k: v for k, v in params.items() if v is not None}
    if request.top_k is not None:
        # top_k is not an OpenAI parameter; vLLM, SGLang, llama-server and llama-cpp-python read it from the body
        params["extra_body"] = {"top_k": request.top_k}
    if request.json_schema is not None:
        params["response_format"] = response_format(request.json_schema, style)
    return params


class OpenAIBackend(RemoteBackend):
    """Stream from any OpenAI-compatible server.

    ``model`` is the default model; ``None`` uses the first model the server lists (``GET /v1/models``).
    ``base_url`` defaults to ``$OPENAI_BASE_URL``, else vLLM's ``http://127.0.0.1:8000/v1``; the API key
    to ``$OPENAI_API_KEY``, else a placeholder (local servers check none). ``timeout`` is the longest wait in
    seconds for the server's next bytes (read timeout; default ``$LLMFIRST_READ_TIMEOUT``, else 300; 0: none),
    ``connect_timeout`` the wait for the connection (``$LLMFIRST_CONNECT_TIMEOUT``, else 10); see
    :mod:`llmfirst_kit.backends._remote`. ``response_format_style`` is how a JSON schema is sent (see
    :func:`response_format`).
    """

    name = "openai"
    capabilities = spec("openai").capabilities
    cold_cache_refusal = ("the OpenAI API has no per-request switch to evaluate a prompt without the server's "
                          "prefix cache; use cache='reuse' with the openai backend, or the embedded backend for "
                          "cold runs")

    @property
    def location(self) -> str:
        return self.base_url

    def __init__(self, model: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, response_format_style: ResponseFormatStyle = "json_schema",
                 connect_timeout: float | None = None):
        if response_format_style not in RESPONSE_FORMAT_STYLES:
            raise InvalidInput(f"response_format_style must be one of {', '.join(RESPONSE_FORMAT_STYLES)}, "
                               f"got {response_format_style!r}")
        super().__init__(timeout=timeout, connect_timeout=connect_timeout)
        self.default_model = model
        self.base_url = (base_url or os.getenv("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key or os.getenv("OPENAI_API_KEY") or NO_KEY
        self.response_format_style: ResponseFormatStyle = response_format_style
        self._served: list[str] | None = None  # model ids listed through the current client

    def resolve_model(self, model: str | None) -> str:
        """The named model, else the default; without either, the server's first model -- known only after
        a call has listed the server's models, so until then this is ``""`` (``prepare`` resolves it)."""
        return model or self.default_model or (self._served[0] if self._served else "")

    def new_client(self) -> openai.AsyncOpenAI:
        # max_retries=0: a retried request would count the client's back-off into TTFT and E2E
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                                  timeout=openai.Timeout(self.timeout, connect=self.connect_timeout))

    def client_reset(self) -> None:
        self._served = None

    async def served_models(self, *, refresh: bool = False) -> list[str]:
        """The ids of the models the server serves (``GET /v1/models``), listed once per event loop."""
        client = self.client()
        if self._served is None or refresh:
            try:
                page = await client.models.list()
            except Exception as exc:
                raise self._translate(exc, "", listing=True) from exc
            self._served = [m.id for m in page.data]
        return self._served

    async def prepare(self, request: CallRequest) -> OpenAIPrepared:
        """Checks the model against the server's list: some servers (llama-cpp-python's) silently answer with
        their default model when asked for one they do not serve."""
        self.check_request(request)
        if request.num_ctx is not None:
            raise InvalidInput("an OpenAI-compatible server's context size is fixed when it starts (vLLM "
                               "--max-model-len, llama-server -c, llama_cpp.server --n_ctx); leave num_ctx unset")
        served = await self.served_models()
        model = self.resolve_model(request.model)
        if not model:
            raise BackendError(f"the server at {self.base_url} lists no models; start it with a model loaded")
        if model not in served:
            served = await self.served_models(refresh=True)  # it may have loaded the model since we listed
        if model not in served:
            raise UnknownModel(f"model {model!r} is not served at {self.base_url}; served: {', '.join(served)}")
        return OpenAIPrepared(model_name=model, messages=list(request.messages),
                              params=completion_params(request, self.response_format_style))

    async def open_stream(self, prepared: OpenAIPrepared, record: CallRecord) -> Any:
        record.model_info = {"base_url": self.base_url}
        return await self.client().chat.completions.create(
            model=prepared.model_name, messages=prepared.messages, stream=True,
            stream_options={"include_usage": True}, **prepared.params)

    def read_part(self, part: Any, t_ns: int, tally: StreamTally, record: CallRecord) -> Iterator[Chunk]:
        record.model_info.setdefault("model_id", part.model)
        if part.usage is not None:  # vLLM and others: a last chunk with usage and no choices
            tally.final = part.usage
        extra = part.model_extra or {}
        if isinstance(extra.get("timings"), dict) or isinstance(extra.get("metrics"), dict):
            tally.server_parts.append({k: extra[k] for k in ("timings", "metrics") if isinstance(extra.get(k), dict)})
        for choice in part.choices:
            text = choice.delta.content or ""
            if text:
                tally.chunks += 1
                # tokens=None: a delta may carry several tokens (vLLM's --stream-interval, a UTF-8
                # character split over tokens); the exact total comes from usage at the end
                yield Chunk(text=text, t_ns=t_ns)
            if choice.finish_reason is not None:
                tally.finish_reason = choice.finish_reason

    def finish(self, prepared: OpenAIPrepared, tally: StreamTally, record: CallRecord) -> None:
        if tally.finish_reason is None:
            raise BackendError(f"the stream from {self.base_url} ended without a finish_reason; the server may have "
                               f"failed (e.g. a prompt longer than its context); check the server's log")
        fill_stats(record, usage=tally.final, finish_reason=tally.finish_reason, chunks=tally.chunks)
        record.server_timings = server_timings(tally.server_parts, tally.final)

    def translate(self, exc: BaseException, prepared: OpenAIPrepared, *, streaming: bool) -> KitError:
        return self._translate(exc, prepared.model_name, streaming=streaming,
                               structured="response_format" in prepared.params)

    def _translate(self, exc: BaseException, model: str, *, listing: bool = False, streaming: bool = False,
                   structured: bool = False) -> KitError:
        """An openai exception -> the kit's error, naming the fix."""
        url = self.base_url
        kind = timeout_kind(exc)  # an APITimeoutError, or the transport's own timeout raised mid-stream
        if kind is not None:
            if kind == "connect":
                return BackendUnavailable(f"{url} did not accept a connection within {self.connect_timeout} s; "
                                          f"check the URL and that the server runs, or "
                                          f"{connect_timeout_fix('OpenAIBackend')}")
            kept = "; the text streamed so far is kept" if streaming else ""
            return BackendError(f"no answer from {url} within {self.timeout} s; {read_timeout_fix('OpenAIBackend')}"
                                f"{kept}")
        if isinstance(exc, openai.APIConnectionError):
            if streaming:
                return BackendError(f"the connection to {url} broke mid-answer ({_cause(exc)}); the text streamed "
                                    f"so far is kept; check the server's log")
            return BackendUnavailable(f"no OpenAI-compatible server reachable at {url}; {START_A_SERVER}")
        if isinstance(exc, openai.APIStatusError):
            status, detail = exc.status_code, _server_message(exc)
            if status in (401, 403):
                return BackendUnavailable(f"the server at {url} refused the API key (HTTP {status}: {detail}); set "
                                          f"OPENAI_API_KEY (or OpenAIBackend(api_key=...)) to the server's key")
            if listing and status == 404:
                return BackendUnavailable(f"no OpenAI-compatible API at {url} (GET {url}/models answered 404); "
                                          f"the base URL usually ends in /v1, e.g. {DEFAULT_BASE_URL}")
            if status == 404:
                served = ", ".join(self._served or []) or "unknown"
                return UnknownModel(f"model {model!r} is not served at {url} (HTTP 404: {detail}); served: {served}")
            if structured and "response_format" in str(exc.message):
                other = "json_object" if self.response_format_style == "json_schema" else "json_schema"
                return InvalidInput(
                    f"the server at {url} does not support the {self.response_format_style!r} form of "
                    f"response_format (HTTP {status}: {detail}); use OpenAIBackend(response_format_style="
                    f"{other!r}) (CLI: --response-format {other}); llama-cpp-python's server needs 'json_object'")
            return BackendError(f"the server at {url} answered HTTP {status}: {detail}")
        if isinstance(exc, openai.APIError):  # an error event inside the stream (e.g. vLLM's)
            return BackendError(f"the server at {url} failed during the call: {exc.message}; the text streamed so "
                                f"far is kept; check the server's log")
        return BackendError(f"OpenAI-compatible call to {url} failed: {type(exc).__name__}: {exc}")


def _server_message(exc: openai.APIStatusError, limit: int = 300) -> str:
    """The server's error message (OpenAI's ``message`` or FastAPI's ``detail``) on one line, without what
    follows a blank line (llama-cpp-python appends a traceback there), cut to ``limit`` characters."""
    body = exc.body
    message = (body.get("message") or body.get("detail")) if isinstance(body, dict) else body
    text = " ".join(str(message or exc.message).split("\n\n")[0].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cause(exc: BaseException) -> str:
    """The transport error under an openai connection error (e.g. the peer closing mid-body)."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def fill_stats(record: CallRecord, *, usage: CompletionUsage | None, finish_reason: str, chunks: int) -> None:
    """Token counts from the server's usage, else the content chunks counted; and the finish reason."""
    record.finish_reason = finish_reason
    if usage is not None:
        record.prompt_tokens = usage.prompt_tokens
        record.output_tokens = usage.completion_tokens
        record.token_count_source = "openai usage (server)"
    else:
        record.output_tokens = chunks
        record.token_count_source = "content chunks (server sent no usage; ~one token per chunk)"


LLAMA_SERVER_TIMINGS = "llama-server timings (server)"
OPENAI_CACHED_TOKENS = "openai usage.prompt_tokens_details (server)"
SERVER_METRICS = "metrics object in the stream (server)"


def server_timings(parts: list[dict[str, Any]], usage: CompletionUsage | None) -> dict[str, Any] | None:
    """The server's own figures for one call, or None when it sent none.

    ``parts``: the ``timings`` / ``metrics`` objects seen in the stream, in order (llama-server sends its
    ``timings`` on the last content chunk and again on the usage chunk; the last one is complete). Returns
    ``{"source": ..., "raw": {...}}`` plus normalised fields where known: ``prompt_tokens_evaluated``
    (llama-server ``prompt_n``: prompt tokens the server evaluated), ``cached_prompt_tokens`` (``cache_n``, or
    ``usage.prompt_tokens_details.cached_tokens``), ``prompt_eval_s`` (``prompt_ms``), ``decode_tokens``
    (``predicted_n``) and ``decode_s`` (``predicted_ms``). ``source`` names every place a figure came from."""
    out: dict[str, Any] = {}
    sources: list[str] = []
    raw: dict[str, Any] = {}
    timings = next((p["timings"] for p in reversed(parts) if "timings" in p), None)
    if timings is not None:
        sources.append(LLAMA_SERVER_TIMINGS)
        raw["timings"] = timings
        ms = lambda key: None if timings.get(key) is None else float(timings[key]) / 1000  # noqa: E731
        out |= {"prompt_tokens_evaluated": timings.get("prompt_n"), "cached_prompt_tokens": timings.get("cache_n"),
                "prompt_eval_s": ms("prompt_ms"), "decode_tokens": timings.get("predicted_n"),
                "decode_s": ms("predicted_ms")}
    metrics = next((p["metrics"] for p in reversed(parts) if "metrics" in p), None)
    if metrics is not None:
        sources.append(SERVER_METRICS)
        raw["metrics"] = metrics
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if cached is not None:
        sources.append(OPENAI_CACHED_TOKENS)
        raw["prompt_tokens_details"] = {"cached_tokens": cached}
        if out.get("cached_prompt_tokens") is None:
            out["cached_prompt_tokens"] = cached
    if not sources:
        return None
    return {"source": " + ".join(sources), **{k: v for k, v in out.items() if v is not None}, "raw": raw}
