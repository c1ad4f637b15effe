"""The engine probe's child process (``python -m llmfirst_kit.models.probe``, started by
:func:`llmfirst_kit.engine.run_probe`): finds the model's file, then loads it and decodes in
:func:`llmfirst_kit.engine.probe_child`. Here rather than in ``engine`` so that the engine, which the model
files' code builds on, never imports it."""

from __future__ import annotations

import argparse

from ..engine import PROBE_MODEL, PROBE_TOKENS, default_threads, probe_child
from .variants import resolve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llmfirst_kit.models.probe", description="engine probe child")
    ap.add_argument("--extra-bufts", choices=("on", "off"), required=True)
    ap.add_argument("--model", default=PROBE_MODEL)
    ap.add_argument("--tokens", type=int, default=PROBE_TOKENS)
    ap.add_argument("--threads", type=int, default=default_threads())
    a = ap.parse_args(argv)
    probe_child(a.extra_bufts == "on", a.model, str(resolve(a.model).path), a.tokens, a.threads)


if __name__ == "__main__":
    main()
