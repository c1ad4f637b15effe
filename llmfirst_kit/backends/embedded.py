"""Embedded backend: llama-cpp-python in this process, no server.

Why a decode loop of our own (on ``Llama.generate``) rather than ``create_chat_completion(stream=True)``:

- exact counts: every sampled token passes through this loop, so output tokens are counted, not
  estimated, and each chunk knows how many tokens it carries;
- every token is stamped with ``perf_counter_ns()`` the moment its text is known;
- cancellation is checked after every token, so decoding stops within one token step;
- text is decoded incrementally (linear time); llama-cpp-python's stream re-detokenizes the whole
  completion for every token.

The prompt is built exactly as llama-cpp-python builds it (the GGUF's Jinja chat template, or a named
chat format), and sampling uses the same ``generate`` call and parameters.

Threading: decoding runs in a worker thread and hands chunks to the event loop with
``call_soon_threadsafe``; the loop never blocks. One ``Llama`` per model file, shared by every backend
instance in the process and guarded by a FIFO lock, so concurrent calls queue fairly.
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from .. import engine
from ..engine import default_threads
from ..errors import BackendError, ContextOverflow, InvalidInput, QueueFull
from ..models import DEFAULT_MODEL, REGISTRY, ResolvedModel, resolve
from ..records import CallRecord
from .base import Backend, CallRequest, Chunk
from .schema_guard import MAX_GRAMMAR_CHARS, NO_FETCH, schema_problem

DEFAULT_N_CTX = 4096
DEFAULT_MAX_QUEUE = 64  # calls that may wait for one model (Ollama's OLLAMA_MAX_QUEUE is alike, 512 by default)
MAX_QUEUE_ENV = "LLMFIRST_MAX_QUEUE"


def max_queue_from_env() -> int:
    """The queue cap from LLMFIRST_MAX_QUEUE, else DEFAULT_MAX_QUEUE."""
    raw = os.environ.get(MAX_QUEUE_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_QUEUE
    if not raw.isdigit():
        raise InvalidInput(f"{MAX_QUEUE_ENV}={raw!r} is not a whole number; set it to how many calls may wait "
                           f"for a model (e.g. {DEFAULT_MAX_QUEUE}), or unset it")
    return int(raw)


class FifoLock:
    """A lock granted in arrival order; a waiter can give up when its call is cancelled.

    The queue is capped at admission: :meth:`admit` takes a call's place in the queue (its ticket is the
    call's ``cancelled`` event) before its decode thread exists, and raises QueueFull when ``max_waiting``
    calls already wait behind the one holding the lock; the thread's :meth:`acquire` then waits in that
    place. Without an admission, ``acquire`` queues at the back (no cap)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def admit(self, ticket: threading.Event, max_waiting: int, what: str = "the model") -> None:
        with self._cond:
            if len(self._queue) > max_waiting:
                raise QueueFull(
                    f"server busy, {what} is answering one call and {len(self._queue) - 1} more wait (at most "
                    f"{max_waiting} may wait); retry later, or raise the cap (llmfirst serve --max-queue N, or "
                    f"{MAX_QUEUE_ENV}=N)")
            self._queue.append(ticket)

    def withdraw(self, ticket: threading.Event) -> None:
        """Give up an admission whose thread never started."""
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def acquire(self, cancelled: threading.Event) -> bool:
        with self._cond:
            if any(entry is cancelled for entry in self._queue):
                me: object = cancelled  # admitted: wait in the place taken then
            else:
                me = object()
                self._queue.append(me)
            while self._queue[0] is not me:
                self._cond.wait(0.05)
                if cancelled.is_set():
                    self._queue.remove(me)
                    self._cond.notify_all()
                    return False
            return True

    def release(self) -> None:
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return max(0, len(self._queue) - 1)


@dataclass
class LoadedModel:
    """A loaded ``Llama`` and its bookkeeping (shared process-wide)."""

    resolved: ResolvedModel
    llm: Any
    n_ctx: int
    n_threads: int
    load_s: float
    lock: FifoLock = field(default_factory=FifoLock)
    formatter: Any = None
    calls: int = 0
    tokens_decoded: int = 0  # every token sampled by this model (for tests of cancellation)
    busy: bool = False

    def format_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages -> prompt tokens, as llama-cpp-python builds them. (The chat format's stop strings are
        its end-of-turn special tokens, which the decode loop already ends on as end-of-generation.)"""
        if not self.resolved.system_role:
            messages = fold_system_message(messages)
        result = self.formatter(messages=messages)
        return self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def fold_system_message(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """For chat formats without a system role: put the system text at the top of the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if system and rest and rest[0].get("role") == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


_LOADED: dict[tuple[str, int, int], LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


@atexit.register
def _close_all() -> None:
    """Free the models before interpreter shutdown: ``Llama.__del__`` run during module teardown fails with
    a traceback (its ``llama_cpp`` globals are already gone). A model still decoding is left alone."""
    for key, loaded in list(_LOADED.items()):
        if not loaded.busy:
            loaded.llm.close()
            _LOADED.pop(key, None)


def loaded_models() -> list[LoadedModel]:
    """The models loaded in this process (the Ollama-compatible API's /api/ps)."""
    return list(_LOADED.values())


def load_model(name_or_path: str | None, *, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None) -> LoadedModel:
    """Load (once per process) the model's ``Llama``; later calls return the same object.

    Policy for a request asking another ``num_ctx``: a second copy is loaded (the weights are memory-mapped,
    so only its KV cache is new memory) and kept, but it shares the first copy's lock: calls to one model file
    decode one at a time, whatever context they asked for."""
    from llama_cpp import llama_chat_format

    resolved = resolve(name_or_path)
    n_threads = n_threads or default_threads()
    key = (str(resolved.path), n_ctx, n_threads)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        t0 = time.perf_counter()
        llm = engine.new_llama(str(resolved.path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                               chat_format=resolved.chat_format)
        load_s = time.perf_counter() - t0
        if resolved.chat_format:
            formatter = getattr(llama_chat_format, f"format_{resolved.chat_format.replace('-', '_')}")
        elif "tokenizer.chat_template" in llm.metadata:
            eos, bos = llm.token_eos(), llm.token_bos()
            formatter = llama_chat_format.Jinja2ChatFormatter(
                template=llm.metadata["tokenizer.chat_template"],
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        else:
            raise InvalidInput(f"{resolved.path} has no chat template; register it in llmfirst_kit.models "
                               f"with a chat_format (e.g. 'gemma', 'chatml')")
        # One decode per model file at a time: copies of a file loaded for another n_ctx (or thread count)
        # share its FIFO lock, so they never decode at once on the same cores (and share the queue cap).
        lock = next((lm.lock for (path, _, _), lm in _LOADED.items() if path == key[0]), None) or FifoLock()
        loaded = LoadedModel(resolved=resolved, llm=llm, n_ctx=n_ctx, n_threads=n_threads, load_s=load_s,
                             formatter=formatter, lock=lock)
        _LOADED[key] = loaded
        return loaded


@dataclass
class Prepared:
    model_name: str
    loaded: LoadedModel
    prompt_tokens: list[int]
    stop: list[str]
    request: CallRequest
    grammar: Any
    cold_load: bool
    choice_tokens: list[int] | None = None  # a choice call: the first token of each option


_DONE = object()


class EmbeddedBackend(Backend):
    """Stream from a GGUF model in-process (llama-cpp-python)."""

    name = "embedded"

    def __init__(self, model: str | None = None, *, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 max_queue: int | None = None):
        """``max_queue``: how many calls may wait for a model while it answers another (default
        ``$LLMFIRST_MAX_QUEUE``, else 64); one more is refused with QueueFull before it takes a thread."""
        self.default_model = model or DEFAULT_MODEL
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.max_queue = max_queue_from_env() if max_queue is None else max_queue
        if self.max_queue < 0:
            raise InvalidInput(f"max_queue must be 0 or more, got {self.max_queue}")

    def resolve_model(self, model: str | None) -> str:
        return resolve(model or self.default_model).name

    def environment(self) -> dict[str, Any]:
        return {"engine": engine.choice().summary(), "n_threads": self.n_threads}

    def model_identity(self, model: str | None) -> str | None:
        """The model file's sha256, the llama-cpp-python version and the engine configuration."""
        import llama_cpp

        config = engine.choice()
        return (f"{resolve(model or self.default_model).sha256} llama-cpp-python {llama_cpp.__version__} "
                f"engine {config.config} on {config.cpu_model}")

    def empty_caches(self) -> bool:
        """Every model loaded in this process, its KV cache emptied under its lock (no decode meanwhile)."""
        for loaded in loaded_models():  # copies of one file (another n_ctx) share a lock: taken one at a time
            loaded.lock.acquire(threading.Event())
            try:
                loaded.llm.reset()
            finally:
                loaded.lock.release()
        return True

    def grammars_built(self) -> int:
        return len(_GRAMMARS)

    def structured_output_problem(self, model: str | None) -> str | None:
        resolved = resolve(model or self.default_model)
        if resolved.spec is not None and not resolved.spec.instruct:
            instruct = [n for n, sp in REGISTRY.items() if sp.instruct]
            return (f"{resolved.name} is a base model (not instruction-tuned) and cannot follow a schema as a "
                    f"decision maker or judge; use one of: {', '.join(instruct)}")
        return None

    def load(self, model: str | None = None, n_ctx: int | None = None) -> LoadedModel:
        return load_model(model or self.default_model, n_ctx=n_ctx or self.n_ctx, n_threads=self.n_threads)

    async def prepare(self, request: CallRequest) -> Prepared:
        model = request.model or self.default_model
        n_ctx = request.num_ctx or self.n_ctx
        key_before = set(_LOADED)
        loaded = await asyncio.to_thread(self.load, model, n_ctx)
        cold = (str(loaded.resolved.path), loaded.n_ctx, loaded.n_threads) not in key_before
        tokens = await asyncio.to_thread(loaded.format_prompt, request.messages)
        if request.reply_prefix:  # the reply continues from this text: its tokens follow the generation prompt
            tokens = tokens + loaded.llm.tokenize(request.reply_prefix.encode("utf-8"), add_bos=False, special=False)
        need = len(tokens) + (1 if request.choices else request.max_tokens)
        if need > loaded.n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens and max_tokens is {request.max_tokens}: {need} tokens, but "
                f"the context of {loaded.resolved.name} is {loaded.n_ctx}; shorten the prompt, lower max_tokens, "
                f"or load the model with a larger n_ctx (nothing was truncated)"
            )
        grammar = None
        if request.json_schema is not None:
            grammar = await asyncio.to_thread(schema_grammar, request.json_schema, loaded)
        choice_tokens = first_tokens(loaded, request.choices) if request.choices else None
        return Prepared(model_name=loaded.resolved.name, loaded=loaded, prompt_tokens=tokens,
                        stop=list(request.stop), request=request, grammar=grammar, cold_load=cold,
                        choice_tokens=choice_tokens)

    async def generate(self, prepared: Prepared, record: CallRecord) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancelled.set()

        loaded = prepared.loaded
        record.model_info = {**loaded.resolved.info(), "engine": engine.choice().config}
        record.cold_load = prepared.cold_load
        record.load_s = loaded.load_s if prepared.cold_load else None
        worker = threading.Thread(target=_decode, args=(prepared, put, cancelled), daemon=True,
                                  name=f"llmfirst-decode-{record.call_id}")
        loaded.lock.admit(cancelled, self.max_queue, loaded.resolved.name)  # QueueFull: no thread, no place
        try:
            worker.start()
        except BaseException:
            loaded.lock.withdraw(cancelled)
            raise
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Chunk):
                    yield item
                elif isinstance(item, dict):  # final statistics
                    record.prompt_tokens = item["prompt_tokens"]
                    record.output_tokens = item["output_tokens"]
                    record.finish_reason = item["finish_reason"]
                    record.token_count_source = "llama.cpp tokenizer (exact)"
                    record.server = {"queue_ns": item["queue_ns"], "prompt_eval_tokens": item["prompt_eval_tokens"]}
                    if "choice" in item:
                        record.choice = item["choice"]
                        record.token_count_source = "a choice: one forward pass, no decoding"
                elif isinstance(item, BaseException):
                    raise item
                elif item is _DONE:
                    return
        finally:
            cancelled.set()  # no-op after a normal end; otherwise the worker stops at its next token


def first_tokens(loaded: LoadedModel, options: list[str]) -> list[int]:
    """The first token of each option as the reply would begin with it; options must differ in it (the
    choice is read from the probabilities of these tokens only)."""
    ids = [loaded.llm.tokenize(o.encode(), add_bos=False, special=False)[0] for o in options]
    if len(set(ids)) != len(ids):
        same = [o for o, i in zip(options, ids) if ids.count(i) > 1]
        raise InvalidInput(f"choices {same} begin with the same token for {loaded.resolved.name}; a choice is read "
                           f"from the first token only, so use options that begin differently")
    return ids


def _choose(llm: Any, prepared: Prepared) -> dict[str, Any]:
    """After the whole prompt was evaluated: the options' first-token probabilities (softmax over the full
    vocabulary; ``mass`` is their total, i.e. how much the model wanted one of them at all)."""
    import numpy as np

    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float64)
    top = logits.max()
    log_z = top + np.log(np.exp(logits - top).sum())
    p = np.exp(logits[prepared.choice_tokens] - log_z)
    options = list(prepared.request.choices or [])
    mass = float(p.sum())
    probs = (p / mass).tolist() if mass > 0 else [1 / len(options)] * len(options)
    best = int(np.argmax(p))
    return {"options": options, "probabilities": [round(x, 6) for x in probs], "chosen": options[best],
            "mass": round(mass, 6)}


_GRAMMARS: dict[tuple[str, str], Any] = {}  # (schema JSON, model file) -> checked LlamaGrammar


def schema_grammar(schema: dict[str, Any], loaded: LoadedModel) -> Any:
    """The llama.cpp grammar for a JSON schema, checked first: llama.cpp crashes the whole process on a
    grammar it cannot parse, so a bad schema must become an InvalidInput here. Checked and built once per
    schema and model (a grammar only holds its text; each call makes its own sampler from it)."""
    from llama_cpp import LlamaGrammar

    key = (json.dumps(schema, sort_keys=True), str(loaded.resolved.path))
    if key not in _GRAMMARS:
        problem = grammar_problem(schema, loaded)
        if problem:
            raise InvalidInput(f"structured output: {problem}")
        _GRAMMARS[key] = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    return _GRAMMARS[key]


MAX_GRAMMAR_DEPTH = 512  # llama.cpp's grammar parser recurses per nesting level and crashes far beyond this


def grammar_problem(schema: dict[str, Any], loaded: LoadedModel) -> str | None:
    """Why this JSON schema cannot constrain the model, or None. Checked before any call because
    llama.cpp crashes the whole process on a grammar it cannot parse (e.g. an empty enum, or a
    maxLength in the thousands nests the grammar too deep). A schema is a client's: before any library
    reads it, :func:`~llmfirst_kit.backends.schema_guard.schema_problem` refuses references outside the
    document (the validator would fetch URLs and open files) and repetition counts that expand into an
    unbounded grammar; the validator gets a copy (it rewrites references in place) and may fetch nothing."""
    import copy

    import fastjsonschema
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    problem = schema_problem(schema)
    if problem:
        return problem
    try:
        fastjsonschema.compile(copy.deepcopy(schema), handlers=NO_FETCH)
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        return f"not a valid JSON schema: {exc}"
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises AssertionError, KeyError... on what it does not know
        return f"this JSON schema cannot be turned into a grammar ({type(exc).__name__}: {exc}); simplify it"
    if len(gbnf) > MAX_GRAMMAR_CHARS or _nesting(gbnf) > MAX_GRAMMAR_DEPTH:
        return ("the grammar made from this JSON schema is too large (long maxLength/maxItems or deep "
                "nesting); lower those limits")
    sampler = llama_cpp.llama_sampler_init_grammar(loaded.llm._model.vocab, gbnf.encode(), b"root")
    if not sampler:
        return "the grammar made from this JSON schema does not parse (e.g. an empty enum); simplify it"
    llama_cpp.llama_sampler_free(sampler)
    return None


def _nesting(gbnf: str) -> int:
    """Deepest parenthesis nesting of a GBNF text, outside string literals and character classes."""
    depth = deepest = 0
    quote: str | None = None
    escaped = False
    for ch in gbnf:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"[":
            quote = '"' if ch == '"' else "]"
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


def _decode(prepared: Prepared, put: Callable[[Any], None], cancelled: threading.Event) -> None:
    """Worker thread: wait for the model, decode token by token, hand chunks to the loop."""
    import llama_cpp

    loaded, req = prepared.loaded, prepared.request
    llm = loaded.llm
    t_queued = time.perf_counter_ns()
    if not loaded.lock.acquire(cancelled):
        put(_DONE)
        return
    try:
        queue_ns = time.perf_counter_ns() - t_queued
        loaded.busy = True
        loaded.calls += 1
        if req.cache == "cold":
            llm.reset()
        cached_prefix = _common_prefix(llm, prepared.prompt_tokens) if req.cache == "reuse" else 0
        llm.set_seed(req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little"))
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        stops = prepared.stop
        holdback = max((len(s) for s in stops), default=1) - 1
        pending_text = ""
        pending_tokens = 0
        output_tokens = 0
        finish = "length"

        def emit(text: str, n: int) -> None:
            put(Chunk(text=text, t_ns=time.perf_counter_ns(), tokens=n))

        if not _prefill(llm, prepared.prompt_tokens[:-1], cancelled):
            put(_DONE)
            return
        if prepared.choice_tokens is not None:  # one forward pass: the last prompt token gives the logits
            llm.eval(prepared.prompt_tokens[llm.n_tokens:])  # the rest of the prompt: its last token gives the logits
            choice = _choose(llm, prepared)
            emit(choice["chosen"], 1)
            put({"prompt_tokens": len(prepared.prompt_tokens), "output_tokens": 1, "finish_reason": "stop",
                 "queue_ns": queue_ns, "prompt_eval_tokens": len(prepared.prompt_tokens) - cached_prefix,
                 "choice": choice})
            put(_DONE)
            return
        gen = llm.generate(
            prepared.prompt_tokens, temp=req.temperature, top_k=req.top_k if req.top_k is not None else 40,
            top_p=req.top_p if req.top_p is not None else 0.95, min_p=0.05, repeat_penalty=1.0,
            grammar=prepared.grammar,
        )
        try:
            for token in gen:
                loaded.tokens_decoded += 1
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                output_tokens += 1
                pending_tokens += 1
                pending_text += utf8.decode(llm.detokenize([token]))
                if stops:
                    hit = min((i for i in (pending_text.find(s) for s in stops) if i >= 0), default=-1)
                    if hit >= 0:
                        pending_text = pending_text[:hit]
                        finish = "stop"
                        break
                    safe = len(pending_text) - holdback if holdback else len(pending_text)
                    if safe > 0:
                        emit(pending_text[:safe], pending_tokens)
                        pending_text, pending_tokens = pending_text[safe:], 0
                elif pending_text:
                    emit(pending_text, pending_tokens)
                    pending_text, pending_tokens = "", 0
                if output_tokens >= req.max_tokens:
                    break
        finally:
            gen.close()
        pending_text += utf8.decode(b"", final=True)
        if pending_text and finish != "cancelled":
            emit(pending_text, pending_tokens)
        if finish == "cancelled":
            put(_DONE)
            return
        put({"prompt_tokens": len(prepared.prompt_tokens), "output_tokens": output_tokens, "finish_reason": finish,
             "queue_ns": queue_ns, "prompt_eval_tokens": len(prepared.prompt_tokens) - cached_prefix})
        put(_DONE)
    except Exception as exc:  # surfaced in the consumer as an error event; text so far is kept
        put(BackendError(f"llama.cpp failed while decoding: {type(exc).__name__}: {exc}"))
    finally:
        loaded.busy = False
        loaded.lock.release()


def _prefill(llm: Any, tokens: list[int], cancelled: threading.Event) -> bool:
    """Evaluate the prompt (all but its last token) one batch at a time, checking for cancellation between
    batches, so a cancelled call stops within one prefill batch (``Llama.generate`` would evaluate the
    whole prompt first). ``generate`` then finds these tokens cached and evaluates the rest in one batch.
    False if cancelled."""
    keep = 0
    for a, b in zip(llm._input_ids[: llm.n_tokens], tokens):
        if a != b:
            break
        keep += 1
    if keep < llm.n_tokens:
        if not llm._ctx.kv_cache_seq_rm(-1, keep, -1):  # no partial removal: start from an empty cache
            llm.reset()
            keep = 0
        llm.n_tokens = keep
    # whole batches only: the rest, with the prompt's last token, is evaluated by ``generate`` in one batch.
    # (Evaluating everything but the last token here would cost a forward pass of its own for that token:
    # one decode step, ~36 ms of TTFT on the 0.5B model, measured by ``bench overhead``.)
    full = (len(tokens) - keep) // llm.n_batch
    if full and (len(tokens) - keep) % llm.n_batch == 0:
        full -= 1
    for i in range(keep, keep + full * llm.n_batch, llm.n_batch):
        if cancelled.is_set():
            return False
        llm.eval(tokens[i: i + llm.n_batch])
    return not cancelled.is_set()


def _common_prefix(llm: Any, tokens: list[int]) -> int:
    """How many prompt tokens llama-cpp-python will find already in its KV cache (and not evaluate)."""
    n = 0
    for a, b in zip(llm._input_ids[: llm.n_tokens], tokens):
        if a != b:
            break
        n += 1
    if n == len(tokens) and not (llm.n_tokens == len(tokens) and not getattr(llm, "_requires_eval", True)):
        n -= 1  # as Llama.generate does: the whole prompt is cached, but its last token is replayed for logits
    return max(n, 0)
