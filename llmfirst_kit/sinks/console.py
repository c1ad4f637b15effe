"""The terminal sink: model text on stdout, the kit's chrome on stderr, one stage at a time.

- **Content** (stdout): the text of each visible stage, exactly as the model streamed it. Several visible stages
  (``staged``: analysis, reasoning, answer) are kept apart by a blank line -- layout, not words.
- **Chrome** (stderr): a ``[stage]`` label before each visible stage when there are several, the invisible stages'
  text, each decision (an undecided one says so and names the kit's default it runs with), errors and the
  metrics line.
- **One stream at a time**: when stages stream at once (the cascade's opening and its answer), the first one
  whose text arrives streams live and the others are held back and shown, in the order their text began, when
  it ends -- so
  two streams never interleave mid-word. Nothing is lost: held text is flushed at the end in any case.

``llmfirst ask ... > answer.txt`` keeps only what the models wrote. The sink's :class:`~llmfirst_kit.compliance.Transcript`
holds every string it wrote, to either stream.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from ..compliance import Transcript
from ..events import Decision, Error, Event, StageEnd, Token

STAGE_GAP = "\n\n"  # between two visible stages' texts on stdout (whitespace: layout, not counted as text)


class ConsoleSink:
    """Implements the :class:`~llmfirst_kit.events.Sink` protocol for a terminal."""

    name = "console"

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *, labels: bool = False):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.labels = labels  # label each visible stage (set when a pipeline has several)
        self.transcript = Transcript(self.name)
        self._active: str | None = None  # the visible stage streaming live
        self._waiting: list[str] = []  # visible stages started while another streams, in order
        self._held: dict[str, list[str]] = {}
        self._ended: set[str] = set()
        self._shown_any = False

    # -- writing: every string goes through one of these two, and into the transcript
    def _content(self, stage: str, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.transcript.content(stage, text)

    def _chrome(self, text: str) -> None:
        self.err.write(text)
        self.err.flush()
        self.transcript.chrome(text)

    def _begin(self, stage: str) -> None:
        self._active = stage
        if self._shown_any:
            self.out.write(STAGE_GAP)
            self.transcript.layout(STAGE_GAP)
        if self.labels:
            self._chrome(f"\n[{stage}]\n")
        self._shown_any = True
        for text in self._held.pop(stage, []):
            self._content(stage, text)

    def _next(self) -> None:
        """The active stage ended: show the held stages in the order their text began."""
        self._active = None
        while self._waiting:
            stage = self._waiting.pop(0)
            self._begin(stage)
            if stage not in self._ended:
                return  # still streaming: it goes on live
            self._active = None

    def handle(self, ev: Event) -> None:
        if isinstance(ev, Token):
            if not ev.visible:
                self._chrome(ev.text)
            elif self._active is None:
                self._begin(ev.stage)  # the first shown stage to stream goes live
                self._content(ev.stage, ev.text)
            elif ev.stage == self._active:
                self._content(ev.stage, ev.text)
            else:
                if ev.stage not in self._waiting:
                    self._waiting.append(ev.stage)
                self._held.setdefault(ev.stage, []).append(ev.text)
        elif isinstance(ev, StageEnd) and ev.stage in (self._active, *self._waiting):
            self._ended.add(ev.stage)
            if ev.stage == self._active:
                self._next()
        elif isinstance(ev, Decision):
            self._chrome(decision_line(ev))
        elif isinstance(ev, Error):
            self._chrome(f"\nllmfirst: error [{ev.code}] in stage {ev.stage}: {ev.message}\n")

    def close(self) -> None:
        """Flush whatever is still held (a run that ended early), then end the line."""
        while self._waiting:
            self._ended.update(self._waiting)
            self._next()
        if self._shown_any:
            self.out.write("\n")
            self.out.flush()
            self.transcript.layout("\n")

    def line(self, text: str) -> None:
        """A line of chrome (e.g. the metrics line) on stderr."""
        self._chrome(text + "\n")


def decision_line(ev: Decision) -> str:
    if ev.status == "decided":
        how = f" ({ev.how()})" if ev.how() else ""
        return f"\n[decision {ev.name}: {json.dumps(ev.value, ensure_ascii=False)}{how}]\n"
    used: Any = json.dumps(ev.used, ensure_ascii=False)
    return f"\n[decision {ev.name}: undecided (the model's output failed twice); the kit's default is used: {used}]\n"
