"""What ran a study, recorded once in ``environment.json``: the machine (``llmfirst_kit.environment``: CPU,
memory bandwidth, the engine configuration), the Jupyter kernel, and every model file the grid uses --
sha256 and size of local model files (embedded), Ollama's digests, or the models an OpenAI-compatible server
lists.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..backends import DEFAULT_BACKEND
from ..errors import KitError
from .notebooks import KERNEL_NAME
from .quantization import local_files, safe_model_id
from .spec import StudySpec


def _model_files(spec: StudySpec) -> list[dict[str, Any]]:
    """sha256, size and path of every model file the grid uses (judge and shipped references too) on a
    backend of local model files; on a server, what the server says of its models."""
    p = spec.parameters
    backend = p.get("backend", DEFAULT_BACKEND)
    if local_files(backend):
        return _local_files(spec, backend)
    return _served_models(spec, backend)


def _local_files(spec: StudySpec, backend: str) -> list[dict[str, Any]]:
    from ..models import resolve

    p, q = spec.parameters, spec.quality
    names = [safe_model_id(backend, m, qq) for m in p["models"] for qq in p["quantizations"]]
    names += [*p["models"], *([p["judge_model"]] if p.get("judge_model") else [])]
    roles = {p.get("judge_model"): "judge"}
    if q.baseline_model and local_files(q.baseline_backend):
        bid = safe_model_id(q.baseline_backend, q.baseline_model, q.baseline_quantization)
        names.append(bid)
        roles[bid] = "baseline"
    for name in (q.quality_judge, q.second_judge) if local_files(q.quality_judge_backend) else ():
        if name:
            names.append(name)
            roles[name] = "quality judge"
    rows = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            rows.append({"role": roles.get(name, "model"), **resolve(name).info()})
        except KitError as exc:
            rows.append({"name": name, "error": str(exc)})
    return rows


def _served_models(spec: StudySpec, backend_name: str) -> list[dict[str, Any]]:
    """Ollama's version, and the digest and size of each model the grid uses; or the models an
    OpenAI-compatible server lists (its API gives no digest). Told apart by what the backend offers: a
    model listing with digests (``list_models``) or only the served names (``served_models``)."""
    from ..backends import backend_options, get_backend
    from ..sync import run_sync

    p = spec.parameters
    try:
        backend = get_backend(backend_name, **backend_options(backend_name, host=p.get("ollama_host") or None,
                                                              base_url=p.get("openai_base_url") or None))
    except KitError as exc:  # an unknown backend: each cell's validation fails with the accepted ones
        return [{"backend_error": str(exc)}]
    if not hasattr(backend, "list_models"):
        try:
            return [{"base_url": backend.base_url, "served": run_sync(_listed(backend))}]
        except KitError as exc:
            return [{"openai_error": str(exc)}]
    wanted = {safe_model_id(backend_name, m, q) for m in p["models"] for q in p["quantizations"]} | (
        {p["judge_model"]} if p.get("judge_model") else set())
    try:
        version = run_sync(backend.version())
        listing = run_sync(backend.list_models())
    except KitError as exc:
        return [{"ollama_error": str(exc)}]
    rows = [{"ollama_version": version, "host": backend.host}]
    for m in listing:
        if m.get("model") in wanted or m.get("name") in wanted:
            rows.append({"name": m.get("model") or m.get("name"), "digest": m.get("digest"), "size": m.get("size"),
                         "details": m.get("details")})
    return rows


async def _listed(server: Any) -> list[str]:
    try:
        return await server.served_models()
    finally:
        await server.aclose()


def capture_environment(spec: StudySpec) -> dict[str, Any]:
    from .. import environment
    from jupyter_client.kernelspec import KernelSpecManager

    env = environment.capture(n_threads=spec.parameters.get("n_threads") or None)
    env["backend"] = spec.parameters.get("backend", DEFAULT_BACKEND)
    env["model_files"] = _model_files(spec)
    with contextlib.suppress(Exception):
        env["kernel"] = {"name": KERNEL_NAME, "argv": KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv}
    return env
