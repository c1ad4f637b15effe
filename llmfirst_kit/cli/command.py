"""What every ``llmfirst`` command shares: exit codes, the positive-integer option type, and the click
command / group classes that turn kit errors into exit codes (bad input 2, else 1; Ctrl-C 130)."""

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
