"""A model at a quantization, as a grid cell names it: the name its backend gets (:func:`model_id`), the
label for tables (:func:`quantization_label`), the quantization types known for local model files, and
building the variants a grid needs (:func:`prepare_variants`; by the runner, or by a Dask worker
whose cache lacks them).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from ..backends import BACKENDS, DEFAULT_BACKEND, capabilities
from ..errors import KitError

SHIPPED = "shipped"


def local_files(backend: str) -> bool:
    """Whether ``backend``'s models are files on this machine (registry names, ``NAME@TYPE`` variants, .gguf
    paths: sha256, quantizing, perplexity / KL). An unknown backend: no (the cell's validation names it)."""
    return backend in BACKENDS and capabilities(backend).local_model_files


def model_id(backend: str, model: str, quantization: str) -> str:
    """The name the backend gets for a model at a quantization: a backend of local model files (embedded)
    ``model@Q8_0`` (the shipped quantization keeps the plain name), a server (Ollama) ``model-q8_0``
    (``default`` keeps the plain tag)."""
    q = quantization.strip()
    if local_files(backend):
        if q.lower() == SHIPPED or model.endswith(".gguf") or os.sep in model:
            return model
        from ..models.variants import variant_name

        return variant_name(model, q)
    return model if q.lower() in ("default", SHIPPED) else f"{model}-{q}"


def safe_model_id(backend: str, model: str, quantization: str) -> str | None:
    """:func:`model_id`, or None where it cannot be formed (unknown model or type; the cell says why)."""
    try:
        return model_id(backend, model, quantization)
    except KitError:
        return None


def quantization_label(backend: str, model: str, quantization: str) -> tuple[str, bool]:
    """(the quantization's name, whether it is the shipped / default one) for tables."""
    q = quantization.strip()
    if local_files(backend):
        from ..models import REGISTRY

        spec = REGISTRY.get(model)
        if q.lower() == SHIPPED:
            return (spec.quantization if spec else SHIPPED), True
        name = q.upper()
        return name, bool(spec and spec.quantization == name)
    return ("default", True) if q.lower() in ("default", SHIPPED) else (q, False)


def quant_types() -> tuple[str, ...]:
    from ..models.variants import QUANT_TYPES

    return QUANT_TYPES


def is_known_quantization(q: str) -> bool:
    return q.lower() == SHIPPED or q.upper() in quant_types()


def prepare_variants(parameters: Mapping[str, Any], echo: Callable[[str], Any]) -> dict[tuple[str, str], str]:
    """Build the quantized variants (of local model files) that cells with these parameters need into this machine's
    cache (once; cached). The runner calls it for the whole grid, a Dask worker for its cell (its cache
    may lack them). Returns build errors by (model, quantization); those cells fail with that error."""
    errors: dict[tuple[str, str], str] = {}
    if not local_files(parameters.get("backend", DEFAULT_BACKEND)):
        return errors
    from ..models import REGISTRY
    from ..models.quantize import quantize
    from ..models.variants import QUANT_TYPES, find_variant

    for model in parameters["models"]:
        for quant in parameters["quantizations"]:
            spec_m = REGISTRY.get(model)
            if quant.lower() == SHIPPED or spec_m is None or quant.upper() not in QUANT_TYPES:
                continue  # a path, an unknown model or type: the cell's own validation names the problem
            if quant.upper() == spec_m.quantization or find_variant(model, quant.upper()):
                continue
            try:
                v = quantize(model, quant, n_threads=parameters.get("n_threads") or None)
            except KitError as exc:
                errors[(model, quant)] = f"{type(exc).__name__}: {exc}"
                continue
            if v.built_s is not None:  # None: another process built it meanwhile
                echo(f"built {v.name} ({v.size / 1e6:.1f} MB) in {v.built_s:.1f} s")
    return errors
