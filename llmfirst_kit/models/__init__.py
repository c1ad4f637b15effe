"""Embedded models: the registry of PyPI-shipped GGUF files, their files on disk, quantized variants,
the quantizer and objective fidelity (perplexity, KL).

Reading order: ``files`` (cache, packages, sha256, assembly) -> ``registry`` (what each model is) ->
``variants`` (``NAME@TYPE``, and ``resolve`` for any model name) -> ``quantize`` (the builder) ->
``fidelity`` (perplexity and KL of a file).
"""

from .files import cache_dir, cached_sha256
from .registry import DEFAULT_MODEL, REGISTRY, ModelSpec, ResolvedModel, get_spec, known_names, status
from .variants import QUANT_TYPES, SHIPPED, resolve

__all__ = ["DEFAULT_MODEL", "REGISTRY", "ModelSpec", "ResolvedModel", "QUANT_TYPES", "SHIPPED", "cache_dir",
           "cached_sha256", "get_spec", "known_names", "resolve", "status"]
