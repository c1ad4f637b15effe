"""Continuous batching: one decode loop per loaded model, every call a sequence in a shared batch.

This is how llama.cpp's server and Ollama's runner serve many calls with one model: each step, one
``llama_decode`` evaluates one token for every sequence that is generating, plus a bounded chunk of the prompts
that wait to be evaluated (chunked prefill: a long new prompt never stalls the streams already running). On a
CPU a step of 8 sequences costs far less than 8 steps of one (the weights are read once per step), so the
machine's throughput grows with the number of calls in flight while each call still gets a token per step.

The loop runs in a thread of its own and is the only code that touches the model's context. Calls reach it as
:class:`Sequence` objects (:meth:`BatchEngine.submit`); each is admitted into a free sequence slot in arrival
order, when the KV cache has room for its prompt and its ``max_tokens`` (one pool of cells shared by all slots:
llama.cpp's unified KV cache). What a call produces is handed back through its ``deliver`` callback (chunks, the
final statistics, an error) from this thread.

Shared prompt prefixes are evaluated once: a slot keeps the tokens its KV cells hold after its call ends, and a
new call starts from the longest prefix it shares with any slot -- taking that slot over when it is idle, or
sharing the cells of a running one (``llama_memory_seq_cp``: in a unified cache the cells are shared, not
copied).

Why a loop of our own rather than a library: the serving engines that batch (llama.cpp's server, vLLM, Ollama)
are servers of their own; the one that runs from Python (the ``xllamacpp`` wheel, a generic CPU build) decoded
one stream slower than this kit's native llama-cpp-python build on the machine it was measured on (see the
docs). This module uses only llama.cpp's own batch, memory and sampler API.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import BackendError, QueueFull
from .base import Chunk

DEFAULT_PREFILL_CHUNK = 128  # prompt tokens evaluated per step while other sequences generate


@dataclass
class Sampling:
    """How a sequence picks its tokens (llama.cpp's sampler chain, as ``Llama.generate`` builds it)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0
    grammar: Any = None  # a llama_cpp.LlamaGrammar, or None


@dataclass
class Sequence:
    """One call inside the engine: its input, its state, and where its output goes.

    ``deliver`` receives, from the engine's thread: :class:`~llmfirst_kit.backends.base.Chunk` objects, then one
    dict of final statistics, or a :class:`BackendError`; then ``None`` (the end).
    ``detokenize`` turns one token into its bytes."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    deliver: Callable[[Any], None]
    detokenize: Callable[[list[int]], bytes]
    stop: list[str] = field(default_factory=list)
    choice_tokens: list[int] | None = None  # a choice: the options' first tokens; no decoding
    choice_options: list[str] | None = None
    reuse_cache: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    # state (the engine's thread only)
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    admitted_ns: int = 0
    slot: int = -1
    reused: int = 0  # prompt tokens found in the KV cache
    evaluated: int = 0  # prompt tokens in the KV cache so far (reused + evaluated by this call)
    next_token: int | None = None  # sampled, fed to the model at the next step
    output_tokens: int = 0
    sampler: Any = None
    steps: int = 0
    batch_sum: int = 0
    batch_max: int = 0
    utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    pending_text: str = ""
    pending_tokens: int = 0

    @property
    def need(self) -> int:
        """KV cells this call may occupy: its prompt and every token it may generate."""
        return len(self.prompt) + (1 if self.choice_tokens is not None else self.max_tokens)


class BatchEngine:
    """The decode loop of one loaded model (a ``llama_cpp.Llama`` built with ``n_seq_max`` = ``parallel`` and a
    unified KV cache of ``kv_cells`` cells).

    ``step_lock`` is held around each step; copies of one model file (another context size) share it, so they
    never decode at the same time on the same cores."""

    def __init__(self, llm: Any, *, parallel: int, kv_cells: int, name: str,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, step_lock: threading.Lock | None = None):
        import llama_cpp

        self.llm = llm
        self.name = name
        self.parallel = parallel
        self.kv_cells = kv_cells
        self.n_batch = llm.n_batch
        self.prefill_chunk = max(1, min(prefill_chunk, self.n_batch))
        self.step_lock = step_lock or threading.Lock()
        self._ctx = llm._ctx.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llm._model.vocab
        self._n_vocab = llm.n_vocab()
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, parallel), 0, 1)
        self._slots: list[Sequence | None] = [None] * parallel
        self._cached: list[list[int]] = [[] for _ in range(parallel)]  # the tokens each slot's KV cells hold
        self._last_used = [0] * parallel
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._paused = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        # counters (read by tests and /api/ps)
        self.calls = 0  # calls admitted into a slot
        self.tokens_decoded = 0  # tokens sampled
        self.steps = 0

    # ------------------------------------------------------------------ the caller's side (any thread)

    def submit(self, seq: Sequence, max_waiting: int) -> None:
        """Queue a call; QueueFull when every slot is taken and ``max_waiting`` calls already wait."""
        with self._cond:
            if self._closed:
                raise BackendError(f"{self.name} was closed; load it again")
            active = sum(s is not None for s in self._slots)
            if active + len(self._waiting) >= self.parallel + max_waiting:
                raise QueueFull(
                    f"server busy, {self.name} decodes {self.parallel} calls at once (--parallel {self.parallel}) and "
                    f"{active + len(self._waiting) - self.parallel} more wait (at most {max_waiting} may wait); retry later, or raise the cap "
                    f"(llmfirst serve --max-queue N, or LLMFIRST_MAX_QUEUE=N) or the parallel sequences "
                    f"(--parallel N, or LLMFIRST_PARALLEL=N)")
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=f"llmfirst-batch-{self.name}")
                self._thread.start()
            self._cond.notify_all()

    def withdraw(self, seq: Sequence) -> None:
        """A call given up by its consumer: leave the queue now if it still waits (else it stops at the next
        step, as its ``cancelled`` event is set)."""
        seq.cancelled.set()
        with self._cond:
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.deliver(None)
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def busy(self) -> bool:
        return self.active > 0 or bool(self._waiting)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Any]:
        """The model to oneself (a benchmark's plain loop, emptying the cache): waits until no call is in a
        slot, holds new ones back, and yields the ``Llama``; its KV cache is emptied before and after."""
        import llama_cpp

        with self._cond:
            self._paused += 1
            while any(s is not None for s in self._slots):
                self._cond.wait(0.05)
        try:
            with self.step_lock:
                llama_cpp.llama_memory_clear(self._mem, True)
                self._cached = [[] for _ in range(self.parallel)]
                self.llm.reset()
                try:
                    yield self.llm
                finally:
                    llama_cpp.llama_memory_clear(self._mem, True)
                    self.llm.reset()
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the engine's thread

    def _run(self) -> None:
        while True:
            with self._cond:  # paused (exclusive use waits): the running calls go on, no new one is admitted
                while not self._closed and not any(self._slots) and (self._paused or not self._waiting):
                    self._cond.wait()
                if self._closed:
                    return
                if not self._paused:
                    self._admit()
            try:
                with self.step_lock:
                    self._step()
            except Exception as exc:  # a failure of the step itself: every sequence in it ends with the error
                import llama_cpp as L

                for seq in [s for s in self._slots if s is not None]:
                    L.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)  # its cells are not trusted any more
                    self._cached[seq.slot] = []
                    self._fail(seq, f"llama.cpp failed while decoding: {type(exc).__name__}: {exc}")
            with self._cond:
                self._cond.notify_all()  # exclusive() waits for slots to empty

    def _admit(self) -> None:
        """Waiting calls into free slots, in arrival order, while the KV cache can hold them (under _cond)."""
        import llama_cpp

        while self._waiting:
            seq = self._waiting[0]
            if seq.cancelled.is_set():
                self._waiting.popleft()
                seq.deliver(None)
                continue
            free = [i for i, s in enumerate(self._slots) if s is None]
            reserved = sum(s.need for s in self._slots if s is not None)
            if not free or reserved + seq.need > self.kv_cells:
                return  # the head waits (arrival order): for a slot, or for cells held by running calls
            self._waiting.popleft()
            if len(free) == self.parallel:  # alone: lay the cache out as a fresh one would be (below)
                self._settle_alone(seq)
            slot, shared, source = self._place(seq, free)
            # cells held by idle slots' caches give way, least recently used first, when a call needs them
            idle = sorted((i for i in free if i != slot and self._cached[i]), key=lambda i: self._last_used[i])
            while idle and reserved + seq.need + sum(len(self._cached[i]) for i in free if i != slot) > self.kv_cells:
                i = idle.pop(0)
                llama_cpp.llama_memory_seq_rm(self._mem, i, -1, -1)
                self._cached[i] = []
            if source == slot:  # taking over an idle slot's cache: keep its shared prefix, drop the rest
                llama_cpp.llama_memory_seq_rm(self._mem, slot, shared, -1)
            else:
                llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
                if shared:
                    llama_cpp.llama_memory_seq_cp(self._mem, source, slot, 0, shared)
            self._cached[slot] = seq.prompt[:shared]
            seq.slot, seq.reused, seq.evaluated = slot, shared, shared
            seq.admitted_ns = time.perf_counter_ns()
            seq.sampler = self._sampler(seq.sampling) if seq.choice_tokens is None else None
            self._slots[slot] = seq
            self.calls += 1

    def _settle_alone(self, seq: Sequence) -> None:
        """A call admitted while no other decodes keeps at most the one cached prefix it will reuse; a cold one
        starts from an empty cache. Where a sequence's cells lie in the shared cache changes how llama.cpp groups
        its float sums, so without this a call alone at temperature 0 could answer differently from the same call
        alone a minute earlier, depending on what earlier calls left in the cache."""
        import llama_cpp as L

        if not seq.reuse_cache:
            L.llama_memory_clear(self._mem, True)
            self._cached = [[] for _ in range(self.parallel)]
            return
        limit = len(seq.prompt) - 1
        keep = max(range(self.parallel), key=lambda i: _common_prefix(self._cached[i], seq.prompt, limit))
        if not _common_prefix(self._cached[keep], seq.prompt, limit):
            L.llama_memory_clear(self._mem, True)
            self._cached = [[] for _ in range(self.parallel)]
            return
        for i in range(self.parallel):
            if i != keep and self._cached[i]:
                L.llama_memory_seq_rm(self._mem, i, -1, -1)
                self._cached[i] = []

    def _place(self, seq: Sequence, free: list[int]) -> tuple[int, int, int]:
        """(slot, tokens of its prompt already in the cache, the slot holding them)."""
        limit = len(seq.prompt) - 1  # the last prompt token is always evaluated: it gives the first logits
        best, source = 0, -1
        if seq.reuse_cache:
            for i, cached in enumerate(self._cached):
                n = _common_prefix(cached, seq.prompt, limit)
                if n > best or (n == best and n and i in free and source not in free):
                    best, source = n, i
        if source in free:
            return source, best, source
        # a free slot: an empty one, else the least recently used cache
        slot = min(free, key=lambda i: (bool(self._cached[i]), self._last_used[i]))
        return slot, best, source

    def _sampler(self, sampling: Sampling) -> Any:
        import llama_cpp as L

        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if sampling.grammar is not None:
            g = sampling.grammar
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_grammar(
                self._vocab, g._grammar.encode("utf-8"), g._root.encode("utf-8")))
        if sampling.temperature == 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(sampling.top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(sampling.top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(sampling.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(sampling.temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(sampling.seed & 0xFFFFFFFF))
        return chain

    def _step(self) -> None:
        """One ``llama_decode``: a token for each generating sequence, then prompt chunks in arrival order."""
        import llama_cpp as L

        for seq in [s for s in self._slots if s is not None and s.cancelled.is_set()]:
            self._finish(seq, None)
        active = sorted((s for s in self._slots if s is not None), key=lambda s: s.admitted_ns)
        if not active:
            return
        batch, n = self._batch, 0
        outputs: list[tuple[Sequence, int]] = []  # sequences whose logits this step gives, at batch index
        fed: list[tuple[Sequence, list[int]]] = []

        def put(token: int, pos: int, slot: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, logits
            batch.seq_id[n][0] = slot
            n += 1

        generating = [s for s in active if s.next_token is not None]
        for seq in generating:
            outputs.append((seq, n))
            put(seq.next_token, len(self._cached[seq.slot]), seq.slot, True)
            fed.append((seq, [seq.next_token]))
        budget = self.prefill_chunk if generating else self.n_batch
        budget = min(budget, self.n_batch - n)
        for seq in active:
            if seq.next_token is not None or budget <= 0:
                continue
            part = seq.prompt[seq.evaluated: seq.evaluated + budget]
            last = seq.evaluated + len(part) == len(seq.prompt)
            for j, token in enumerate(part):
                put(token, seq.evaluated + j, seq.slot, last and j == len(part) - 1)
            if last:
                outputs.append((seq, n - 1))
            fed.append((seq, part))
            budget -= len(part)
        batch.n_tokens = n
        in_step = len(fed)
        rc = L.llama_decode(self._ctx, batch)
        if rc != 0:
            for seq, _ in fed:  # the cells of a failed step are not trusted: the slot starts empty next time
                L.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
                self._cached[seq.slot] = []
                self._fail(seq, f"llama_decode returned {rc}" + (
                    " (no room in the KV cache): lower max_tokens or --parallel, or load the model with a larger "
                    "context (n_ctx / num_ctx)" if rc == 1 else ""))
            return
        self.steps += 1
        now = time.perf_counter_ns()
        for seq, tokens in fed:
            self._cached[seq.slot].extend(tokens)
            self._last_used[seq.slot] = now
            if seq.next_token is None:
                seq.evaluated += len(tokens)
            seq.steps += 1
            seq.batch_sum += in_step
            seq.batch_max = max(seq.batch_max, in_step)
        for seq, index in outputs:
            try:
                if seq.choice_tokens is not None:
                    choice = self._choose(seq, index)
                    seq.deliver(Chunk(text=choice["chosen"], t_ns=time.perf_counter_ns(), tokens=1))
                    self._finish(seq, "stop", choice=choice)
                else:
                    self._take(seq, L.llama_sampler_sample(seq.sampler, self._ctx, index))
            except Exception as exc:  # this sequence fails; the others go on
                self._fail(seq, f"llama.cpp failed while decoding: {type(exc).__name__}: {exc}")

    def _choose(self, seq: Sequence, index: int) -> dict[str, Any]:
        """The options' first-token probabilities at this batch index (softmax over the full vocabulary;
        ``mass`` is their total, i.e. how much the model wanted one of them at all)."""
        import llama_cpp as L
        import numpy as np

        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, index),
                                       shape=(self._n_vocab,)).astype(np.float64)
        top = logits.max()
        log_z = top + np.log(np.exp(logits - top).sum())
        p = np.exp(logits[seq.choice_tokens] - log_z)
        options = list(seq.choice_options or [])
        mass = float(p.sum())
        probs = (p / mass).tolist() if mass > 0 else [1 / len(options)] * len(options)
        best = int(np.argmax(p))
        return {"options": options, "probabilities": [round(x, 6) for x in probs], "chosen": options[best],
                "mass": round(mass, 6)}

    def _take(self, seq: Sequence, token: int) -> None:
        """A sampled token: end, or text for the consumer."""
        import llama_cpp as L

        self.tokens_decoded += 1
        if seq.cancelled.is_set():
            self._finish(seq, None)
            return
        if L.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop")
            return
        seq.output_tokens += 1
        seq.pending_tokens += 1
        seq.pending_text += seq.utf8.decode(seq.detokenize([token]))
        if seq.stop:
            hit = min((i for i in (seq.pending_text.find(s) for s in seq.stop) if i >= 0), default=-1)
            if hit >= 0:
                seq.pending_text = seq.pending_text[:hit]
                self._finish(seq, "stop")
                return
            holdback = max(len(s) for s in seq.stop) - 1
            safe = len(seq.pending_text) - holdback
            if safe > 0:
                self._emit(seq, seq.pending_text[:safe])
                seq.pending_text = seq.pending_text[safe:]
        elif seq.pending_text:
            self._emit(seq, seq.pending_text)
            seq.pending_text = ""
        if seq.output_tokens >= seq.max_tokens:
            self._finish(seq, "length")
            return
        seq.next_token = token

    def _emit(self, seq: Sequence, text: str) -> None:
        seq.deliver(Chunk(text=text, t_ns=time.perf_counter_ns(), tokens=seq.pending_tokens))
        seq.pending_tokens = 0

    def _release(self, seq: Sequence) -> None:
        import llama_cpp as L

        if seq.sampler is not None:
            L.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if 0 <= seq.slot < self.parallel and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None

    def _finish(self, seq: Sequence, reason: str | None, choice: dict[str, Any] | None = None) -> None:
        """End a call: ``reason`` stop / length, or None for a cancelled one (nothing more is delivered)."""
        self._release(seq)
        if reason is None:
            seq.deliver(None)
            return
        # bytes of a character cut off by the end are dropped: the kit shows no character the model did not write
        cut_bytes = len(seq.utf8.getstate()[0])
        if seq.pending_text:
            self._emit(seq, seq.pending_text)
            seq.pending_text = ""
        stats: dict[str, Any] = {
            "prompt_tokens": len(seq.prompt), "output_tokens": 1 if choice else seq.output_tokens,
            "finish_reason": reason, "queue_ns": seq.admitted_ns - seq.submitted_ns,
            "prompt_eval_tokens": len(seq.prompt) - seq.reused,
            "batch": {"steps": seq.steps, "mean": round(seq.batch_sum / seq.steps, 3) if seq.steps else 0,
                      "max": seq.batch_max, "parallel": self.parallel},
        }
        if cut_bytes:
            stats["incomplete_utf8_bytes_dropped"] = cut_bytes
        if choice is not None:
            stats["choice"] = choice
        seq.deliver(stats)
        seq.deliver(None)

    def _fail(self, seq: Sequence, message: str) -> None:
        self._release(seq)
        seq.deliver(BackendError(message))
        seq.deliver(None)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n
