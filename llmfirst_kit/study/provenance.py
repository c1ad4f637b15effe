"""What ran a study, recorded once in ``environment.json``: the machine (``llmfirst_kit.environment``: CPU,
memory bandwidth, the engine configuration), the Jupyter kernel, and every model file the grid uses --
sha256 and size of embedded files, Ollama's digests, or the models an OpenAI-compatible server lists.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import KitError
from .notebooks import KERNEL_NAME
from .quantization import safe_model_id
from .spec import StudySpec


def _model_files(spec: StudySpec) -> list[dict[str, Any]]:
    """sha256, size and path of every embedded file the grid uses (judge and shipped references too),
    Ollama's digest and size of each model, or the models an OpenAI-compatible server lists (the API gives
    no digest)."""
    p = spec.parameters
    if p.get("backend", "embedded") == "embedded":
        from ..models import resolve

        q = spec.quality
        names = [safe_model_id("embedded", m, qq) for m in p["models"] for qq in p["quantizations"]]
        names += [*p["models"], *([p["judge_model"]] if p.get("judge_model") else [])]
        roles = {p.get("judge_model"): "judge"}
        if q.baseline_model and q.baseline_backend == "embedded":
            bid = safe_model_id("embedded", q.baseline_model, q.baseline_quantization)
            names.append(bid)
            roles[bid] = "baseline"
        for name in (q.quality_judge, q.second_judge) if q.quality_judge_backend == "embedded" else ():
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
    from ..sync import run_sync

    if p.get("backend") == "openai":
        from ..backends.openai import OpenAIBackend

        server = OpenAIBackend(base_url=p.get("openai_base_url") or None)
        try:
            return [{"base_url": server.base_url, "served": run_sync(_listed(server))}]
        except KitError as exc:
            return [{"openai_error": str(exc)}]
    from ..backends.ollama import OllamaBackend

    backend = OllamaBackend(host=p.get("ollama_host") or None)
    wanted = {safe_model_id("ollama", m, q) for m in p["models"] for q in p["quantizations"]} | (
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
    env["backend"] = spec.parameters.get("backend", "embedded")
    env["model_files"] = _model_files(spec)
    with contextlib.suppress(Exception):
        env["kernel"] = {"name": KERNEL_NAME, "argv": KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv}
    return env
