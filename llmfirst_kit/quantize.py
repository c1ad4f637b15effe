"""Quantized variants of the shipped embedded models, built with llama.cpp's own quantizer.

``quantize("smollm2-135m", "Q8_0")`` writes ``cache_dir()/variants/smollm2-135m@Q8_0.gguf`` and a JSON
sidecar beside it (sha256, size, source file and its sha256, llama.cpp version). The variant is then a
model name like any other: ``smollm2-135m@Q8_0`` (``models.resolve`` hands names with ``@`` to
:func:`resolve_variant`), so pipelines, the CLI and studies take it unchanged.

Honest caveat, repeated wherever results are shown: the source is the *shipped* GGUF, which is already
quantized (Q4_K_M / Q4_1); no 16-bit original is shipped. A variant is a re-quantization of those weights
(``allow_requantize``): ``@Q8_0`` is not better than the shipped file, only bigger; lower types lose
quality on top of the shipped file's own loss. Quality is measured against the shipped file
(``llmfirst_kit.quality``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from .errors import KitError, ModelFileError, UnknownModel
from .models import ResolvedModel, cache_dir, cached_sha256, get_spec, known_names, resolve

SHIPPED = "shipped"

# The types one can build from an already-quantized file without an importance matrix (the IQ* and
# Q2_K_S types need one, and llama.cpp refuses them without it).
QUANT_TYPES: tuple[str, ...] = (
    "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
)


class QuantizeError(KitError):
    code = "quantize_failed"


@dataclass(frozen=True)
class Variant:
    """A built variant: its file, checksum and where it came from."""

    name: str  # "<model>@<TYPE>"
    base: str
    quantization: str
    path: Path
    sha256: str
    size: int
    source_path: str
    source_sha256: str
    llama_cpp_version: str
    built_s: float | None = None  # seconds this build took (None: found already built)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "quantization": self.quantization, "path": str(self.path),
                "sha256": self.sha256, "size": self.size, "source_path": self.source_path,
                "source_sha256": self.source_sha256, "llama_cpp_version": self.llama_cpp_version,
                "built_s": self.built_s}


def normalize_type(qtype: str) -> str:
    """``"q8_0"`` -> ``"Q8_0"``; an unknown type is an error listing the accepted ones."""
    name = qtype.strip().upper()
    if name not in QUANT_TYPES:
        raise UnknownModel(f"unknown quantization type {qtype!r}; accepted: {', '.join(QUANT_TYPES)}")
    return name


def split_name(name: str) -> tuple[str, str]:
    """``"smollm2-135m@q8_0"`` -> ``("smollm2-135m", "Q8_0")``; ``@shipped`` keeps ``"shipped"``."""
    base, _, qtype = name.partition("@")
    if not base or not qtype:
        raise UnknownModel(f"model {name!r}: a variant is written <model>@<TYPE>, e.g. smollm2-135m@Q8_0")
    return base, (SHIPPED if qtype.strip().lower() == SHIPPED else normalize_type(qtype))


def variant_name(base: str, qtype: str) -> str:
    """The name a model takes at a quantization: the shipped one keeps the registry name."""
    if qtype.strip().lower() == SHIPPED or normalize_type(qtype) == get_spec(base).quantization:
        return base
    return f"{base}@{normalize_type(qtype)}"


def variant_path(base: str, qtype: str) -> Path:
    return cache_dir() / "variants" / f"{base}@{qtype}.gguf"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_variant(base: str, qtype: str, path: Path) -> Variant:
    data = json.loads(_sidecar(path).read_text())
    return Variant(name=f"{base}@{qtype}", base=base, quantization=qtype, path=path, sha256=data["sha256"],
                   size=data["size"], source_path=data["source_path"], source_sha256=data["source_sha256"],
                   llama_cpp_version=data.get("llama_cpp_version", ""))


def find_variant(base: str, qtype: str) -> Variant | None:
    """The built variant, or None if it is not built (or built from a different shipped file)."""
    path = variant_path(base, qtype)
    try:
        variant = _read_variant(base, qtype, path)
    except (OSError, ValueError, KeyError):
        return None
    if not path.is_file() or variant.source_sha256 != get_spec(base).sha256:
        return None
    return variant


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
    with _build_lock(path):
        if not force and (found := find_variant(base, qtype)) is not None:
            return found  # built by another process (e.g. a second Dask worker on this machine) while we waited
        return _build(base, qtype, path, n_threads)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One build of a variant at a time on this machine, across processes and threads (``flock`` on a file
    opened per call). Without it, two builders could rename their files over each other and leave a sidecar
    that describes the other one's file. The lock file stays: removing it would let a third builder lock a
    new file while the second still holds the old one."""
    import fcntl

    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(base: str, qtype: str, path: Path, n_threads: int | None) -> Variant:
    import llama_cpp

    spec = get_spec(base)
    source = resolve(base)  # assembles and verifies the shipped file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True  # the shipped file is already quantized
    params.nthread = n_threads or 0  # 0: llama.cpp uses every core
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with _llama_log_to(log):
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
    side = _sidecar(path)
    tmp_side = side.with_name(f".{side.name}.tmp{os.getpid()}")
    tmp_side.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_side, side)
    return replace(_read_variant(base, qtype, path), built_s=built_s)


@contextlib.contextmanager
def _llama_log_to(buffer: io.StringIO):
    """Collect llama.cpp's log (the quantizer prints a line per tensor) instead of flooding stderr.

    llama-cpp-python's log callback prints to ``sys.stderr`` when its logger's level allows; both are
    restored afterwards."""
    from llama_cpp import _logger

    level = _logger.logger.level
    _logger.logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        _logger.logger.setLevel(level)


def resolve_variant(name: str) -> ResolvedModel:
    """``models.resolve`` for ``<model>@<TYPE>``: the built file, checked against its sidecar's sha256."""
    base, qtype = split_name(name)
    spec = get_spec(base)
    if qtype == SHIPPED or qtype == spec.quantization:
        return resolve(base)
    path = variant_path(base, qtype)
    build = f"llmfirst models quantize {base} --to {qtype}"
    if not path.is_file() or not _sidecar(path).is_file():
        raise UnknownModel(f"variant {base}@{qtype} is not built; run: {build}")
    variant = _read_variant(base, qtype, path)
    if variant.source_sha256 != spec.sha256:
        raise ModelFileError(f"variant {variant.name} was built from a different {base} file; run: {build} --force")
    digest = cached_sha256(path)
    if digest != variant.sha256:
        raise ModelFileError(f"variant {variant.name}: sha256 of {path} is {digest}, its build recorded "
                             f"{variant.sha256} (file corrupt or changed); run: {build} --force")
    vspec = replace(spec, name=variant.name, title=f"{spec.title} ({qtype}, re-quantized)", file=path.name,
                    sha256=variant.sha256, size=variant.size, quantization=qtype, packages=())
    return ResolvedModel(name=variant.name, path=path, spec=vspec, sha256=variant.sha256)


def list_variants() -> list[Variant]:
    """Every variant built in the cache, valid or not (``find_variant`` says which are current)."""
    out = []
    for side in sorted((cache_dir() / "variants").glob("*@*.json")):
        base, _, qtype = side.stem.partition("@")
        if base in known_names() and qtype in QUANT_TYPES:
            with contextlib.suppress(OSError, ValueError, KeyError):
                out.append(_read_variant(base, qtype, side.with_suffix(".gguf")))
    return out


__all__ = ["QUANT_TYPES", "SHIPPED", "Variant", "QuantizeError", "quantize", "resolve_variant", "find_variant",
           "list_variants", "variant_name", "variant_path", "normalize_type", "split_name"]
