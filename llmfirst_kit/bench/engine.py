"""``llmfirst bench engine``: decode tokens/s of the embedded engine with llama.cpp's extra buffers on and
off, side by side, each run a fresh child process (:func:`llmfirst_kit.engine.run_probe`)."""

from __future__ import annotations

from typing import Any

from .. import engine
from ._ab import interleave


def compare(*, model: str = "qwen2.5-coder-0.5b", runs: int = 3, tokens: int = 128,
            n_threads: int | None = None) -> dict[str, Any]:
    """Decode speed with extra buffers on and off, side by side: ``runs`` interleaved pairs, each run a
    fresh child process (a configuration that crashes this machine crashes only its child). Ratios are
    what to compare; absolute tokens/s differ between machines of one kind."""
    chosen = engine.choice()
    samples: dict[str, list[float]] = {"on": [], "off": []}
    crashed: dict[str, str] = {}
    for _, side in interleave(("on", "off"), range(runs)):
        if side in crashed:
            continue
        out = engine.run_probe(use_extra_bufts=side == "on", model=model, tokens=tokens, n_threads=n_threads)
        if out["status"] == "ok" and out.get("decode_tok_s"):
            samples[side].append(out["decode_tok_s"])
        else:
            crashed[side] = out.get("signal") or out.get("detail", out["status"])
    med = {k: sorted(v)[len(v) // 2] if v else None for k, v in samples.items()}  # the upper median
    return {"model": model, "tokens": tokens, "runs": runs, "threads": n_threads or engine.default_threads(),
            "cpu_model": chosen.cpu_model, "chosen": chosen.config, "probe_wall_s": chosen.probe.get("wall_s"),
            "decode_tok_s_extra_bufts_on": samples["on"], "decode_tok_s_extra_bufts_off": samples["off"],
            "median_on": med["on"], "median_off": med["off"],
            "ratio_on_over_off": round(med["on"] / med["off"], 3) if med["on"] and med["off"] else None,
            "failed": crashed}
