"""Embedded backend: llama-cpp-python in this process, no server.

Why a decode loop of our own (llama.cpp's batch API) rather than ``create_chat_completion(stream=True)``:

- exact counts: every sampled token passes through this loop, so output tokens are counted, not
  estimated, and each chunk knows how many tokens it carries;
- every token is stamped with ``perf_counter_ns()`` the moment its text is known;
- cancellation is checked at every step, so decoding stops within one token step (a prompt being evaluated
  stops within one prefill chunk);
- text is decoded incrementally (linear time); llama-cpp-python's stream re-detokenizes the whole
  completion for every token.

The prompt is built exactly as llama-cpp-python builds it (the GGUF's Jinja chat template, or a named
chat format), and each call samples with llama.cpp's sampler chain built as ``Llama.generate`` builds it (grammar,
then greedy at temperature 0, else top-k, top-p, min-p, temperature and a seeded draw).

Threading and batching: one ``Llama`` per model file, shared by every backend instance in the process, and one
decode loop per ``Llama`` (:mod:`llmfirst_kit.backends.batching`) in a thread of its own: concurrent calls are
sequences of one batch, admitted in arrival order into ``parallel`` sequence slots (``$LLMFIRST_PARALLEL``). The
loop hands chunks to the event loop with ``call_soon_threadsafe``; the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .. import engine
from ..engine import default_threads
from ..errors import ContextOverflow, InvalidInput
from ..models import DEFAULT_MODEL, REGISTRY, ResolvedModel, resolve
from ..records import CallRecord
from ..settings import settings
from .base import Backend, CallRequest, Chunk, LoadedModelInfo
from .registry import spec
from .batching import BatchEngine, Sampling, Sequence
from .schema_guard import MAX_GRAMMAR_CHARS, NO_FETCH, schema_problem

DEFAULT_N_CTX = 4096
KV_CELLS_PER_SEQUENCE = 1024  # the shared KV cache holds max(n_ctx, this x parallel) cells


@dataclass
class LoadedModel:
    """A loaded ``Llama``, its decode loop and its bookkeeping (shared process-wide)."""

    resolved: ResolvedModel
    llm: Any
    n_ctx: int  # the most one call may hold: prompt + max_tokens
    n_threads: int
    load_s: float
    engine: BatchEngine
    formatter: Any = None

    @property
    def parallel(self) -> int:
        return self.engine.parallel

    @property
    def calls(self) -> int:
        return self.engine.calls

    @property
    def tokens_decoded(self) -> int:
        """Every token sampled by this model (for tests of cancellation)."""
        return self.engine.tokens_decoded

    @property
    def busy(self) -> bool:
        return self.engine.busy

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


_LOADED: dict[tuple[str, int, int, int], LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


@atexit.register
def _close_all() -> None:
    """Free the models before interpreter shutdown: ``Llama.__del__`` run during module teardown fails with
    a traceback (its ``llama_cpp`` globals are already gone). A model still decoding is left alone."""
    for key, loaded in list(_LOADED.items()):
        if not loaded.busy:
            loaded.engine.close()
            loaded.llm.close()
            _LOADED.pop(key, None)


def loaded_models() -> list[LoadedModel]:
    """The models loaded in this process (the Ollama-compatible API's /api/ps)."""
    return list(_LOADED.values())


def load_model(name_or_path: str | None, *, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
               parallel: int | None = None) -> LoadedModel:
    """Load (once per process) the model's ``Llama`` and start its decode loop; later calls return the same.

    ``n_ctx`` is the most one call may hold (prompt + max_tokens); the KV cache is one pool of
    max(n_ctx, 1024 x parallel) cells shared by the ``parallel`` sequences. Policy for a request asking another
    ``num_ctx`` (or another ``parallel``): a second copy is loaded (the weights are memory-mapped, so mostly its
    KV cache is new memory) and kept, but it shares the first copy's step lock: copies of one model file never
    decode at the same time on the same cores."""
    from llama_cpp import llama_chat_format

    resolved = resolve(name_or_path)
    n_threads = n_threads or default_threads()
    parallel = parallel or settings().parallel
    key = (str(resolved.path), n_ctx, n_threads, parallel)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        kv_cells = max(n_ctx, KV_CELLS_PER_SEQUENCE * parallel)
        t0 = time.perf_counter()
        llm = engine.new_llama(str(resolved.path), n_ctx=kv_cells, n_threads=n_threads, n_threads_batch=n_threads,
                               chat_format=resolved.chat_format, n_seq_max=parallel)
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
            llm.close()
            raise InvalidInput(f"{resolved.path} has no chat template; register it in llmfirst_kit.models "
                               f"with a chat_format (e.g. 'gemma', 'chatml')")
        step_lock = next((lm.engine.step_lock for (path, *_), lm in _LOADED.items() if path == key[0]), None)
        loop = BatchEngine(llm, parallel=parallel, kv_cells=kv_cells, name=resolved.name, step_lock=step_lock)
        loaded = LoadedModel(resolved=resolved, llm=llm, n_ctx=n_ctx, n_threads=n_threads, load_s=load_s,
                             engine=loop, formatter=formatter)
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


class EmbeddedBackend(Backend):
    """Stream from a GGUF model in-process (llama-cpp-python)."""

    name = "embedded"
    capabilities = spec("embedded").capabilities

    def __init__(self, model: str | None = None, *, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 max_queue: int | None = None, parallel: int | None = None):
        """``max_queue``: how many calls may wait for a model while all its sequences are taken (default
        ``$LLMFIRST_MAX_QUEUE``, else 64); one more is refused with QueueFull. ``parallel``: how many calls a
        model decodes at once (default ``$LLMFIRST_PARALLEL``, else 4). ``n_ctx``: the most one call may hold."""
        self.default_model = model or DEFAULT_MODEL
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.max_queue = settings().max_queue if max_queue is None else max_queue
        if self.max_queue < 0:
            raise InvalidInput(f"max_queue must be 0 or more, got {self.max_queue}")
        self.parallel = settings().parallel if parallel is None else parallel
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise InvalidInput(f"parallel must be a whole number of at least 1, got {self.parallel!r}")

    def resolve_model(self, model: str | None) -> str:
        return resolve(model or self.default_model).name

    def environment(self) -> dict[str, Any]:
        return {"engine": engine.choice().summary(), "n_threads": self.n_threads, "parallel": self.parallel}

    def model_identity(self, model: str | None) -> str | None:
        """The model file's sha256, the llama-cpp-python version and the engine configuration."""
        import llama_cpp

        config = engine.choice()
        return (f"{resolve(model or self.default_model).sha256} llama-cpp-python {llama_cpp.__version__} "
                f"engine {config.config} on {config.cpu_model}")

    def empty_caches(self) -> bool:
        """Every model loaded in this process, its KV cache emptied (waits for the calls it is decoding)."""
        for loaded in loaded_models():
            with loaded.engine.exclusive():
                pass
        return True

    def grammars_built(self) -> int:
        return len(_GRAMMARS)

    def loaded(self) -> list[LoadedModelInfo]:
        return [LoadedModelInfo(name=lm.resolved.name, path=str(lm.resolved.path), sha256=lm.resolved.sha256,
                                metadata=dict(lm.llm.metadata), n_ctx=lm.n_ctx, parallel=lm.parallel,
                                active=lm.engine.active, waiting=lm.engine.waiting) for lm in loaded_models()]

    def model_metadata(self, model: str) -> dict[str, str]:
        """From the loaded model, else a vocab-only load (no weights read)."""
        resolved = resolve(model)
        for lm in loaded_models():
            if lm.resolved.name == resolved.name:
                return dict(lm.llm.metadata)
        llm = engine.new_llama(str(resolved.path), vocab_only=True)
        try:
            return dict(llm.metadata)
        finally:
            llm.close()

    def structured_output_problem(self, model: str | None) -> str | None:
        resolved = resolve(model or self.default_model)
        if resolved.spec is not None and not resolved.spec.instruct:
            instruct = [n for n, sp in REGISTRY.items() if sp.instruct]
            return (f"{resolved.name} is a base model (not instruction-tuned) and cannot follow a schema as a "
                    f"decision maker or judge; use one of: {', '.join(instruct)}")
        return None

    @property
    def default_n_ctx(self) -> int:  # type: ignore[override]
        return self.n_ctx

    def schema_problem(self, schema: dict[str, Any], model: str | None, n_ctx: int | None = None) -> str | None:
        return grammar_problem(schema, self.load(model, n_ctx))

    def prompt_tokens(self, messages: list[dict[str, str]], model: str | None, n_ctx: int | None = None) -> int:
        return len(self.load(model, n_ctx).format_prompt(messages))

    def load(self, model: str | None = None, n_ctx: int | None = None) -> LoadedModel:
        return load_model(model or self.default_model, n_ctx=n_ctx or self.n_ctx, n_threads=self.n_threads,
                          parallel=self.parallel)

    async def prepare(self, request: CallRequest) -> Prepared:
        model = request.model or self.default_model
        n_ctx = request.num_ctx or self.n_ctx
        key_before = set(_LOADED)
        loaded = await asyncio.to_thread(self.load, model, n_ctx)
        cold = (str(loaded.resolved.path), loaded.n_ctx, loaded.n_threads, loaded.parallel) not in key_before
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
        loaded, req = prepared.loaded, prepared.request

        def deliver(item: Any) -> None:  # from the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                seq.cancelled.set()

        seq = Sequence(
            prompt=prepared.prompt_tokens, max_tokens=req.max_tokens, stop=prepared.stop, deliver=deliver,
            detokenize=lambda tokens: loaded.llm.detokenize(tokens),
            sampling=Sampling(temperature=req.temperature, top_k=req.top_k if req.top_k is not None else 40,
                              top_p=req.top_p if req.top_p is not None else 0.95,
                              seed=req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little"),
                              grammar=prepared.grammar),
            choice_tokens=prepared.choice_tokens, choice_options=req.choices, reuse_cache=req.cache == "reuse")
        record.model_info = {**loaded.resolved.info(), "engine": engine.choice().config}
        record.cold_load = prepared.cold_load
        record.load_s = loaded.load_s if prepared.cold_load else None
        loaded.engine.submit(seq, self.max_queue)  # QueueFull: refused before it takes a place
        ended = False
        try:
            while True:
                item = await queue.get()
                if item is None:
                    ended = True
                    return
                if isinstance(item, Chunk):
                    yield item
                elif isinstance(item, dict):  # final statistics
                    record.prompt_tokens = item["prompt_tokens"]
                    record.output_tokens = item["output_tokens"]
                    record.finish_reason = item["finish_reason"]
                    record.token_count_source = "llama.cpp tokenizer (exact)"
                    record.server = {k: item[k] for k in ("queue_ns", "prompt_eval_tokens", "batch",
                                                          "incomplete_utf8_bytes_dropped") if k in item}
                    if "choice" in item:
                        record.choice = item["choice"]
                        record.token_count_source = "a choice: one forward pass, no decoding"
                elif isinstance(item, BaseException):
                    ended = True
                    raise item
        finally:
            if not ended:  # the consumer left: the call leaves the queue, or stops at the next step
                loaded.engine.withdraw(seq)


def first_tokens(loaded: LoadedModel, options: list[str]) -> list[int]:
    """The first token of each option as the reply would begin with it; options must differ in it (the
    choice is read from the probabilities of these tokens only)."""
    ids = [loaded.llm.tokenize(o.encode(), add_bos=False, special=False)[0] for o in options]
    if len(set(ids)) != len(ids):
        same = [o for o, i in zip(options, ids) if ids.count(i) > 1]
        raise InvalidInput(f"choices {same} begin with the same token for {loaded.resolved.name}; a choice is read "
                           f"from the first token only, so use options that begin differently")
    return ids


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
    except Exception as exc:  # the validator's own failures on shapes the checks above did not foresee
        return f"not a valid JSON schema ({type(exc).__name__}: {exc})"
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
