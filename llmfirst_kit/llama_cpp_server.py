"""``python -m llmfirst_kit.llama_cpp_server ARGS``: llama-cpp-python's OpenAI-compatible server
(``python -m llama_cpp.server ARGS``, the same arguments), with its models loaded in this machine's engine
configuration (:mod:`llmfirst_kit.engine`).

Why: on Intel CPUs with AMX, llama.cpp's extra buffer types crash the first decode, and ``llama_cpp.server``
has no option to turn them off, so ``python -m llama_cpp.server`` dies by SIGSEGV on such a machine at its
first request. This wrapper applies the verdict of the engine probe, then runs that server unchanged.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    from . import engine

    c = engine.use_in_this_process()
    print(f"llmfirst: engine {c.config} (extra buffers {'on' if c.use_extra_bufts else 'off'}) on {c.cpu_model}",
          file=sys.stderr, flush=True)
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
