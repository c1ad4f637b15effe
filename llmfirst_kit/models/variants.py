"""Quantized variants of the shipped models: their names (``NAME@TYPE``), files and lookup.

A variant is built by ``llmfirst_kit.models.quantize`` into ``cache_dir()/variants/NAME@TYPE.gguf`` with a
JSON sidecar (sha256, size, source file and its sha256, llama.cpp version). Its name is then a model name
like any other, so pipelines, the CLI and studies take it unchanged.

Honest caveat, repeated wherever results are shown: the source is the *shipped* GGUF, which is already
quantized (Q4_K_M / Q4_1); no 16-bit original is shipped. A variant is a re-quantization of those weights:
``@Q8_0`` is not better than the shipped file, only bigger; lower types lose quality on top of the shipped
file's own loss (``llmfirst_kit.models.fidelity`` measures it against the shipped file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, UnknownModel
from .files import cache_dir, cached_sha256
from .registry import ResolvedModel, get_spec, resolve_registered

SHIPPED = "shipped"

# The types one can build from an already-quantized file without an importance matrix (the IQ* and
# Q2_K_S types need one, and llama.cpp refuses them without it).
QUANT_TYPES: tuple[str, ...] = (
    "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
)


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


def resolve_variant(name: str) -> ResolvedModel:
    """``models.resolve`` for ``<model>@<TYPE>``: the built file, checked against its sidecar's sha256."""
    base, qtype = split_name(name)
    spec = get_spec(base)
    if qtype == SHIPPED or qtype == spec.quantization:
        return resolve_registered(base)
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


def resolve(name_or_path: str | None) -> ResolvedModel:
    """The verified GGUF file of a registry name, a variant (``NAME@TYPE``) or a local ``.gguf`` path."""
    if name_or_path and "@" in name_or_path and not name_or_path.endswith(".gguf"):
        return resolve_variant(name_or_path)
    return resolve_registered(name_or_path)


__all__ = ["QUANT_TYPES", "SHIPPED", "Variant", "resolve", "resolve_variant", "find_variant", "variant_name",
           "variant_path", "normalize_type", "split_name"]
