"""The JSONL sink: run and call records appended as they end, and read back.

Append-only, one JSON object a line (``{"kind": "run" | "call", ...record}``), fsync'ed at once, so a crash
loses at most the call in progress; a torn last line is expected and skipped, any other bad line reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from ..records import CallRecord, RunRecord


class RunLog:
    """Append-only JSONL log. Each record is written and fsync'ed as soon as it is finished, so a crash
    loses at most the call in progress."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: CallRecord | RunRecord) -> None:
        kind = "run" if isinstance(record, RunRecord) else "call"
        line = json.dumps({"kind": kind, **record.to_dict()}, ensure_ascii=False)
        # after a crash mid-write the file ends in a torn line: start on a fresh line, or this record is lost too
        prefix = "\n" if _ends_torn(self.path) else ""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(prefix + line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def __iter__(self) -> Iterator[CallRecord | RunRecord]:
        return iter(read_log(self.path))


def _ends_torn(path: Path) -> bool:
    """True if the file exists, is not empty and does not end with a newline."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


class CorruptLog(ValueError):
    """Lines of a run log that are not records (other than a torn last line)."""


def _torn(line: str, exc: Exception) -> bool:
    """A record's beginning cut off: an object that ran out of text (not garbage, not a bad but whole line)."""
    return (isinstance(exc, json.JSONDecodeError) and line.startswith('{"')
            and (exc.pos >= len(line) - 8 or exc.msg.startswith("Unterminated string")))  # a cut word: "nu", "1."


def read_log(path: str | os.PathLike[str], *, strict: bool = False,
             problems: list[str] | None = None) -> list[CallRecord | RunRecord]:
    """Read a JSONL run log. A torn last line (a crash mid-write: a record's beginning, cut off) is expected and
    skipped. Any other line that is not a record (a garbage last line, a line nested too deep for the parser) is
    reported, never skipped silently, and the rest of the log is read: appended to ``problems`` as
    ``"FILE:LINE: what"`` if given, else warned about (``strict=True``: raises :class:`CorruptLog`)."""
    out: list[CallRecord | RunRecord] = []
    found: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
            kind = data.pop("kind", "call")
            out.append(RunRecord.from_dict(data) if kind == "run" else CallRecord.from_dict(data))
        except (ValueError, RecursionError, AttributeError, TypeError, KeyError) as exc:
            # the torn last line of a crash mid-write: the beginning of a record, cut off (the parser ran out of
            # text); any other bad line, the last one included, is reported
            if i == last and _torn(line, exc):
                continue
            found.append(f"{path}:{i + 1}: not a record ({type(exc).__name__}: {exc}; a line torn by an earlier "
                         f"crash, or corruption); it stays in the file: fix or delete it")
    if found:
        if strict:
            raise CorruptLog("; ".join(found))
        if problems is not None:
            problems.extend(found)
        else:
            import warnings

            warnings.warn(f"{len(found)} corrupt line(s) in {path}: " + "; ".join(found[:3]), stacklevel=2)
    return out


def write_log(path: str | os.PathLike[str], records: Iterable[CallRecord | RunRecord]) -> None:
    log = RunLog(path)
    for r in records:
        log.append(r)
