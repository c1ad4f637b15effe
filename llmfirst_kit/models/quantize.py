"""Build quantized variants with llama.cpp's own quantizer (``llama_model_quantize``, requantizing the
shipped file; see ``variants`` for what that means for quality).

``quantize("smollm2-135m", "Q8_0")`` writes ``cache_dir()/variants/smollm2-135m@Q8_0.gguf`` and its sidecar,
once per machine: builds are serialised by a file lock, so two Dask workers on one machine never build the
same file twice or rename over each other.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from .._fs import atomic_write, file_lock
from ..engine import llama_log_to
from ..errors import KitError
from .files import cached_sha256
from .registry import get_spec, resolve_registered
from .variants import Variant, _read_variant, _sidecar, find_variant, normalize_type, variant_path


class QuantizeError(KitError):
    code = "quantize_failed"


def quantize(base: str, qtype: str, *, force: bool = False, n_threads: int | None = None) -> Variant:
    """Build ``base@qtype`` from the shipped file (once; ``force`` rebuilds). Returns the variant."""
    qtype = normalize_type(qtype)
    spec = get_spec(base)
    if qtype == spec.quantization:
        raise QuantizeError(f"{base} is shipped as {qtype}; use the name {base!r} itself (or {base}@shipped)")
    if not force and (found := find_variant(base, qtype)) is not None:
        return found
    path = variant_path(base, qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f".{path.name}.lock")):
        if not force and (found := find_variant(base, qtype)) is not None:
            return found  # built by another process (e.g. a second Dask worker on this machine) while we waited
        return _build(base, qtype, path, n_threads)


def _build(base: str, qtype: str, path: Path, n_threads: int | None) -> Variant:
    import llama_cpp

    spec = get_spec(base)
    source = resolve_registered(base)  # assembles and verifies the shipped file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True  # the shipped file is already quantized
    params.nthread = n_threads or 0  # 0: llama.cpp uses every core
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with llama_log_to(log):
            rc = llama_cpp.llama_model_quantize(str(source.path).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            tail = " | ".join(line for line in log.getvalue().splitlines()[-5:] if line.strip())
            raise QuantizeError(f"llama.cpp could not quantize {base} to {qtype} (code {rc}): {tail or 'no log'}")
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written variant under its name
    finally:
        tmp.unlink(missing_ok=True)
    built_s = time.perf_counter() - t0
    digest = cached_sha256(path) or ""
    meta = {"sha256": digest, "size": path.stat().st_size, "quantization": qtype, "base": base,
            "source_path": str(source.path), "source_sha256": source.sha256, "source_quantization": spec.quantization,
            "llama_cpp_version": llama_cpp.__version__, "built_s": round(built_s, 3),
            "note": "re-quantized from the shipped (already quantized) file, not from 16-bit weights"}
    atomic_write(_sidecar(path), json.dumps(meta, indent=1))
    return replace(_read_variant(base, qtype, path), built_s=built_s)


__all__ = ["QuantizeError", "quantize"]
