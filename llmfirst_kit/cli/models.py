"""``llmfirst models``: the embedded model registry and each model's status; ``models quantize`` builds
quantized variants of a shipped model into the cache."""

from __future__ import annotations

import json
import sys

import click

from .. import engine
from ..models import DEFAULT_MODEL, known_names, status
from .command import EXIT_OK, POSITIVE, Group
from .doctor import engine_line


@click.group("models", cls=Group, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON list")
@click.pass_context
def command(ctx: click.Context, as_json: bool) -> int | None:
    """the embedded model registry and each model's status"""
    if ctx.invoked_subcommand is not None:
        return None
    rows = [status(name) for name in known_names()]
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return EXIT_OK
    for r in rows:
        state = "verified" if r["verified"] else ("installed" if r["installed"] else "missing")
        default = " (default)" if r["name"] == DEFAULT_MODEL else ""
        print(f"{r['name']:<20} {r['title']:<30} {r['quantization']:<7} {r['parameters']:>5} "
              f"{r['size'] / 1e6:7.1f} MB  {'instruct' if r['instruct'] else 'base':<8} {state}{default}")
        if r.get("problem"):
            print(f"    {r['problem']}")
    print(engine_line(engine.choice()))
    return EXIT_OK


@command.command("quantize")
@click.argument("name")
@click.option("--to", "to", required=True, help="comma-separated types, e.g. Q8_0,Q5_K_M,Q4_0,Q3_K_S,Q2_K")
@click.option("--force", is_flag=True, help="rebuild variants that exist")
@click.option("--threads", type=POSITIVE, default=None)
@click.option("--json", "as_json", is_flag=True, help="print one JSON list")
def quantize(name: str, to: str, force: bool, threads: int | None, as_json: bool) -> int:
    """build quantized variants of a shipped model into the cache

    NAME is a registry model, e.g. smollm2-135m.
    """
    from ..models.quantize import quantize as build

    rows = []
    for qtype in [t.strip() for t in to.split(",") if t.strip()]:
        v = build(name, qtype, force=force, n_threads=threads)
        rows.append(v.info())
        if not as_json:
            how = f"built in {v.built_s:.1f} s" if v.built_s is not None else "already built"
            print(f"{v.name:<28} {v.size / 1e6:8.1f} MB  sha256 {v.sha256}  {how}\n    {v.path}")
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        print("(re-quantized from the shipped, already quantized file; use as --model NAME@TYPE)", file=sys.stderr)
    return EXIT_OK
