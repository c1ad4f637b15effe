"""The ``llmfirst`` command: a click group, one module per command, each thin over functions a notebook can
call too (``ask``, ``doctor``, ``models``, ``study``, ``bench``, ``serve``).

Model text goes to stdout as it streams; stage labels, decisions and the metrics line go to stderr, so
``llmfirst ask ... > answer.txt`` keeps only what the model wrote (``sinks.console``).

Exit codes: 0 ok, 1 failed, 2 bad input (a usage error, or an input the kit refused before any model call),
130 cancelled (Ctrl-C). :func:`main` runs the command in-process and returns its exit code, so tests and
notebooks call ``main(["ask", "..."])``; a usage error still ends in ``SystemExit(2)`` as at a terminal.
"""

from __future__ import annotations

import click

from . import ask, bench, doctor, models, serve, study  # each defines one command
from .command import (BAD_INPUT_CODES, CONTEXT, EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, POSITIVE,
                      Group)


@click.group(cls=Group, context_settings=CONTEXT)
def llmfirst() -> None:
    """Streaming LLM-first pipelines, measured."""


def main(argv: list[str] | None = None) -> int:
    """Run ``llmfirst ARGV...`` in this process; returns the exit code. A usage error (an unknown option, a
    value that does not fit) prints click's message naming the fix and raises ``SystemExit(2)``."""
    try:
        code = llmfirst.main(args=argv, prog_name="llmfirst", standalone_mode=False)
    except click.exceptions.Abort:
        return EXIT_CANCELLED
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    return EXIT_OK if code is None else int(code)


for _module in (ask, doctor, models, study, bench, serve):
    llmfirst.add_command(_module.command)
del _module

__all__ = ["BAD_INPUT_CODES", "EXIT_BAD_INPUT", "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_OK", "POSITIVE", "llmfirst",
           "main"]
