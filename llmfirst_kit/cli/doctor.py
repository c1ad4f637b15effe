"""``llmfirst doctor``: this machine's CPU and the embedded engine configuration chosen for it."""

from __future__ import annotations

import json

import click

from .. import engine
from .command import EXIT_OK, Command


def engine_line(c: engine.EngineChoice) -> str:
    return f"engine: {c.config} (extra buffers {'on' if c.use_extra_bufts else 'off'}) on {c.cpu_model}: {c.reason}"


@click.command("doctor", cls=Command)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--reprobe", is_flag=True, help="probe again instead of using the cached verdict")
def command(as_json: bool, reprobe: bool) -> int:
    """this machine's CPU and the embedded engine configuration chosen for it"""
    c = engine.choice(refresh=reprobe)
    if as_json:
        print(json.dumps(c.to_dict(), ensure_ascii=False, indent=2))
        return EXIT_OK
    print(f"cpu:      {c.cpu_model} (AMX {'yes' if c.cpu_amx else 'no'})")
    print(f"llama.cpp: llama-cpp-python {c.llama_cpp_version}; {c.build_features}")
    print(engine_line(c))
    probe = c.probe
    if probe:
        cost = f"{probe['wall_s']:.1f} s" if "wall_s" in probe else "?"
        print(f"probe:    {probe['status']}, {cost}{' (cached from ' + c.decided_at + ')' if c.cached else ''}")
    return EXIT_OK
