"""The embedded engine on this machine: the one place a ``llama_cpp.Llama`` is built, and how.

Why this module exists: llama.cpp built natively repacks weights into "extra buffer types" at load time --
its AMX buffer on Intel CPUs with AMX (Sapphire Rapids and later), its CPU_REPACK buffer for AVX2/AVX-512
elsewhere. On some AMX machines (seen under KVM) the first decode then dies with a segmentation fault
(ggml-org/llama.cpp#20824, ollama/ollama#17249). A segfault cannot be caught in Python, so the choice is
made by *measuring*, not by guessing from the CPU name:

1. a child process loads the smallest shipped model with extra buffers on and decodes a few tokens
   (the "probe"); the log lines of the load say which buffer types were used;
2. if the child dies by a signal, every model of this process is loaded with extra buffers off
   (``llama_model_params.use_extra_bufts = False``): plain weights, slower on some CPUs, safe on all;
3. the verdict is cached in ``$LLMFIRST_CACHE/engine/`` keyed by CPU model, CPU flags and llama.cpp build,
   so the probe runs once per machine (a few seconds) -- and under a file lock, so two processes starting
   at once (Dask workers, a notebook and a server) probe once between them.

A machine where the fast path works keeps it. ``LLMFIRST_ENGINE=safe`` forces extra buffers off,
``LLMFIRST_ENGINE=fast`` forces them on (no probe); the default ``auto`` probes.

Configurations, as reported by ``llmfirst doctor``, in every call record and in study environments:

- ``amx``: extra buffers on, and the build and CPU have AMX (weights repacked into the AMX buffer);
- ``cpu-repack``: extra buffers on, no AMX (llama.cpp's CPU repack);
- ``none``: extra buffers off (the safe configuration).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ._fs import atomic_write, file_lock, utc_now
from .settings import settings

PROBE_CHILD = "llmfirst_kit.models.probe"  # the child's module (it resolves the model's file, then probe_child)
PROBE_MODEL = "smollm2-135m"  # the smallest shipped model: the probe costs about a second of loading
PROBE_TOKENS = 8
PROBE_TIMEOUT_S = 180.0
# The probe's fault injection: set in a test's environment, the probe child kills itself with SIGSEGV right
# after loading with extra buffers on, as the AMX path does on the machines it crashes on.
FAKE_CRASH_ENV = "LLMFIRST_ENGINE_PROBE_FAKE_CRASH"


def default_threads() -> int:
    """All cores (llama-cpp-python's own default is half of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineChoice:
    """How every ``Llama`` of this process is loaded, and why."""

    config: str  # amx | cpu-repack | none
    use_extra_bufts: bool
    reason: str
    mode: str  # auto | safe | fast (LLMFIRST_ENGINE)
    key: str  # what the verdict is cached under: CPU model, flags, llama.cpp build
    cpu_model: str
    cpu_amx: bool
    build_features: str  # llama.cpp's system info line
    llama_cpp_version: str
    probe: dict[str, Any] = field(default_factory=dict)  # the probe's outcome (empty when none ran)
    decided_at: str = field(default_factory=utc_now)
    cached: bool = False  # read from the machine's cache (the probe ran in an earlier process)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """What a call record carries: the configuration, the reason and the CPU."""
        return {"config": self.config, "use_extra_bufts": self.use_extra_bufts, "reason": self.reason,
                "cpu_model": self.cpu_model}


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and flags (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8481C" (recorded with every run:
    machines of one kind differ, and their numbers differ with them)."""
    return _cpu()[0]


def _build() -> tuple[str, str]:
    import llama_cpp

    return llama_cpp.__version__, llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def _config_name(use_extra_bufts: bool, cpu_amx: bool, build_features: str) -> str:
    if not use_extra_bufts:
        return "none"
    return "amx" if cpu_amx and "AMX" in build_features else "cpu-repack"


def machine_key(model: str, flags: list[str], version: str, features: str) -> str:
    """What an engine verdict is cached under: CPU model and flags, llama.cpp build, architecture."""
    blob = json.dumps([model, sorted(flags), version, features, platform.machine()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _verdict_path(key: str):
    from ._fs import cache_dir

    return cache_dir() / "engine" / f"{key}.json"


_CHOICE: EngineChoice | None = None
_CHOICE_LOCK = threading.Lock()


def choice(*, refresh: bool = False) -> EngineChoice:
    """The engine configuration of this process: decided once (probing once per machine)."""
    global _CHOICE
    with _CHOICE_LOCK:
        if _CHOICE is None or refresh:
            _CHOICE = _decide(refresh=refresh)
        return _CHOICE


def _decide(*, refresh: bool) -> EngineChoice:
    mode = settings().engine
    model, flags = _cpu()
    version, features = _build()
    amx = any(f.startswith("amx") for f in flags)
    key = machine_key(model, flags, version, features)
    base = dict(mode=mode, key=key, cpu_model=model, cpu_amx=amx, build_features=features,
                llama_cpp_version=version)
    if mode == "safe":
        return EngineChoice(config="none", use_extra_bufts=False, reason="LLMFIRST_ENGINE=safe: extra buffers "
                            "off by the operator's choice", **base)
    if mode == "fast":
        return EngineChoice(config=_config_name(True, amx, features), use_extra_bufts=True,
                            reason="LLMFIRST_ENGINE=fast: extra buffers on by the operator's choice, not probed",
                            **base)
    path = _verdict_path(key)
    with file_lock(path.with_suffix(".lock")):
        if not refresh:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(path.read_text())
                if data["key"] == key:
                    data["cached"], data["mode"] = True, mode
                    return EngineChoice(**data)
        outcome = run_probe(use_extra_bufts=True)
        chosen = _from_probe(outcome, base)
        if outcome["status"] in ("ok", "crashed"):  # a verdict about the machine: keep it
            atomic_write(path, json.dumps(chosen.to_dict(), indent=1))
        return chosen


def _from_probe(outcome: dict[str, Any], base: dict[str, Any]) -> EngineChoice:
    amx, features = base["cpu_amx"], base["build_features"]
    if outcome["status"] == "ok":
        buffers = ", ".join(outcome.get("buffers") or []) or "none reported"
        return EngineChoice(config=_config_name(True, amx, features), use_extra_bufts=True, probe=outcome,
                            reason=f"probe decoded {outcome['tokens']} tokens with extra buffers on "
                                   f"(buffers: {buffers}) in {outcome['wall_s']:.1f} s", **base)
    if outcome["status"] == "crashed":
        reason = (f"probe child died by {outcome['signal']} with extra buffers on "
                  f"({'AMX CPU' if amx else 'no AMX'}); loading every model with extra buffers off")
    else:  # the probe could not run (e.g. its model is not installed): safe, and asked again next process
        reason = f"probe could not run ({outcome.get('detail', 'unknown')}); extra buffers off until it can"
    return EngineChoice(config="none", use_extra_bufts=False, reason=reason, probe=outcome, **base)


def run_probe(*, use_extra_bufts: bool, model: str = PROBE_MODEL, tokens: int = PROBE_TOKENS,
              n_threads: int | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Load ``model`` and decode ``tokens`` greedy tokens in a child process; what happened to it.

    ``status``: ok (with ``tokens``, ``decode_tok_s``, ``buffers``), crashed (killed by ``signal``) or failed
    (exited with an error, timed out). The child's verdict reaches the parent as its last stdout line."""
    cmd = [sys.executable, "-m", PROBE_CHILD, "--extra-bufts", "on" if use_extra_bufts else "off",
           "--model", model, "--tokens", str(tokens), "--threads", str(n_threads or default_threads())]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "LLMFIRST_ENGINE": "safe"})  # the child never probes itself
    except subprocess.TimeoutExpired:
        return {"status": "failed", "detail": f"no answer in {timeout_s:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return {"status": "crashed", "signal": name, "returncode": proc.returncode, "wall_s": round(wall, 3),
                "stderr_tail": proc.stderr.strip().splitlines()[-3:]}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"status": "failed", "returncode": proc.returncode, "detail": tail or "no output",
                "wall_s": round(wall, 3)}
    result = json.loads(lines[-1])
    return {"status": "ok", **result, "wall_s": round(wall, 3)}


# --------------------------------------------------------------------------------------- construction

_CONSTRUCT_LOCK = threading.Lock()


def new_llama(model_path: str, *, use_extra_bufts: bool | None = None, n_seq_max: int = 1, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path, **kwargs)`` loaded with this machine's engine configuration, and a context
    of ``n_seq_max`` sequences sharing one unified KV cache of ``n_ctx`` cells (the batched decode loop's).

    llama-cpp-python has no argument for ``use_extra_bufts`` nor ``n_seq_max``: ``Llama.__init__`` fills its
    model and context params from ``llama_model_default_params()`` and ``llama_context_default_params()``, so
    those functions are wrapped for the duration of the construction (under a lock; every ``Llama`` of the kit
    is built here)."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    extra = choice().use_extra_bufts if use_extra_bufts is None else use_extra_bufts
    kwargs.setdefault("verbose", False)
    with _CONSTRUCT_LOCK:
        model_defaults = llama_module.llama_cpp.llama_model_default_params
        context_defaults = llama_module.llama_cpp.llama_context_default_params

        def model_params() -> Any:
            p = model_defaults()
            p.use_extra_bufts = extra
            return p

        def context_params() -> Any:
            p = context_defaults()
            p.n_seq_max = n_seq_max
            p.kv_unified = True
            return p

        llama_module.llama_cpp.llama_model_default_params = model_params
        llama_module.llama_cpp.llama_context_default_params = context_params
        try:
            return llama_cpp.Llama(model_path=str(model_path), **kwargs)
        finally:
            llama_module.llama_cpp.llama_model_default_params = model_defaults
            llama_module.llama_cpp.llama_context_default_params = context_defaults


def use_in_this_process() -> EngineChoice:
    """Make every ``Llama`` this process builds from now on use the machine's configuration, whoever builds
    it (e.g. llama-cpp-python's own server, :mod:`llmfirst_kit.llama_cpp_server`). For a process of its own:
    the kit's code builds through :func:`new_llama` instead."""
    import llama_cpp.llama as llama_module

    c = choice()
    original = llama_module.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = c.use_extra_bufts
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    return c


# --------------------------------------------------------------------------------------- the probe child


def probe_child(use_extra_bufts: bool, model: str, path: str, tokens: int, n_threads: int) -> None:
    """Runs in the probe's child (:mod:`llmfirst_kit.models.probe`, which finds the model's file): load,
    decode, print one JSON line. May die by a signal (that is the point)."""
    import io

    buffers: list[str] = []
    log = io.StringIO()
    with llama_log_to(log):
        t0 = time.perf_counter()
        llm = new_llama(str(path), use_extra_bufts=use_extra_bufts, n_ctx=256, n_threads=n_threads,
                        n_threads_batch=n_threads, verbose=True)
        load_s = time.perf_counter() - t0
    for line in log.getvalue().splitlines():
        if "model buffer size" in line:  # e.g. "load_tensors:   CPU_REPACK model buffer size = 45.0 MiB"
            name = line.split("load_tensors:")[-1].split("model buffer size")[0].strip()
            if name and name not in buffers:
                buffers.append(name)
    if use_extra_bufts and os.environ.get(FAKE_CRASH_ENV):
        os.kill(os.getpid(), signal.SIGSEGV)
    prompt = llm.tokenize(b"The capital of France is", add_bos=True)
    n, t_first = 0, None
    t0 = time.perf_counter()
    for _ in llm.generate(prompt, temp=0.0, top_k=1):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n >= tokens:
            break
    end = time.perf_counter()
    decode_s = end - (t_first or end)
    print(json.dumps({"tokens": n, "load_s": round(load_s, 3), "buffers": buffers,
                      "use_extra_bufts": use_extra_bufts, "model": model, "threads": n_threads,
                      "decode_tok_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None}))


@contextlib.contextmanager
def llama_log_to(buffer: Any):
    """Collect llama.cpp's log lines (llama-cpp-python prints them to ``sys.stderr`` when its logger allows)."""
    import logging

    from llama_cpp import _logger

    level = _logger.logger.level
    _logger.logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        _logger.logger.setLevel(level)
