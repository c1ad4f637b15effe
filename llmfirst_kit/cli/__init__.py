"""The ``llmfirst`` command: a click group, one module per command, each thin over functions a notebook can
call too (``ask``, ``doctor``, ``models``, ``study``, ``bench``, ``serve``).

Model text goes to stdout as it streams; stage labels, decisions and the metrics line go to stderr, so
``llmfirst ask ... > answer.txt`` keeps only what the model wrote (``sinks.console``).

Exit codes: 0 ok, 1 failed, 2 bad input (a usage error, or an input the kit refused before any model call),
130 cancelled (Ctrl-C). :func:`main` runs the command in-process and returns its exit code, so tests and
notebooks call ``main(["ask", "..."])``; a usage error still ends in ``SystemExit(2)`` as at a terminal.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from ..errors import ContextOverflow, InvalidInput, KitError, UnknownModel

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130
BAD_INPUT_CODES = {cls.code for cls in (InvalidInput, ContextOverflow, UnknownModel)}
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class PositiveInt(click.IntRange):
    """An integer of at least 1, refused with the fix's words ("a positive integer") otherwise."""

    name = "positive integer"

    def __init__(self) -> None:
        super().__init__(min=1)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"expected a positive integer, got {value!r}", param, ctx)
        if number <= 0:
            self.fail(f"must be a positive integer (at least 1), got {number}", param, ctx)
        return number


POSITIVE = PositiveInt()


def _fail(as_json: bool, exc: KitError, code: int) -> int:
    """A kit error as the command's last word: one JSON object on stdout under ``--json``, and always one
    ``llmfirst: error: ...`` line on stderr; returns the exit code."""
    if as_json:
        print(json.dumps({"status": "error", "code": exc.code, "error": str(exc)}, ensure_ascii=False))
    print(f"llmfirst: error: {exc}", file=sys.stderr)
    return code


def _guarded(ctx: click.Context, invoke: Callable[[click.Context], Any]) -> Any:
    """Runs a command; kit errors become exit codes (bad input 2, else 1), Ctrl-C 130."""
    try:
        return invoke(ctx)
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    except InvalidInput as exc:
        return _fail(bool(ctx.params.get("as_json")), exc, EXIT_BAD_INPUT)
    except KitError as exc:
        return _fail(bool(ctx.params.get("as_json")), exc, EXIT_FAILED)


class Command(click.Command):
    """A command whose callback returns its exit code; kit errors handled by :func:`_guarded`."""

    def invoke(self, ctx: click.Context) -> Any:
        return _guarded(ctx, super().invoke)


class Group(click.Group):
    """A group whose commands are :class:`Command` (and subgroups :class:`Group`)."""

    command_class = Command

    def invoke(self, ctx: click.Context) -> Any:
        return _guarded(ctx, super().invoke)


Group.group_class = Group


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


from . import ask, bench, doctor, models, serve, study  # noqa: E402  (the commands register on the group)

for _module in (ask, doctor, models, study, bench, serve):
    llmfirst.add_command(_module.command)
del _module

__all__ = ["BAD_INPUT_CODES", "EXIT_BAD_INPUT", "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_OK", "POSITIVE", "llmfirst",
           "main"]
