"""LLM-first compliance, measured where a person sees the text.

Three figures, each of which can come out below 1.0:

- **sink compliance** (:func:`sink_compliance`): a sink (the CLI, the WebSocket, the HTTP APIs, the
  notebook view) keeps a :class:`Transcript` of what it emitted. Its *content* -- the text it presents as the
  model's words (CLI stdout, WebSocket ``token`` messages, API message contents, the view's stage texts) -- is
  aligned, stage by stage and in order, against what that stage's model call really wrote (runs of at least
  :data:`MIN_MATCH` characters). Compliance =
  characters of content that match the model's output and are not an echo of the kit's own prompt / all
  characters of content. Whitespace is layout (a blank line between stages) and is not counted. The sink's
  *chrome* (stage labels, status lines, metrics: the CLI's stderr, the view's header) is kept apart in the
  transcript and counted (``chrome_chars``), never presented as a model's words.
- **prompt echo** (:func:`prompt_echo_chars`): model output that reproduces kit-written prompt text sent in
  that run (``RunRecord.kit_prompts``: the system prompt, each stage's task) is kit-authored text, even though a
  model emitted it. Found as shared runs of :data:`ECHO_WORDS` words (case and punctuation ignored).
- **decision compliance** (:func:`decision_compliance`): decisions the model made / all decisions; a
  configured default used because the model's structured output failed twice is the kit's, not the model's.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from .records import RunRecord

ECHO_WORDS = 8  # a run of this many words shared with a kit prompt is an echo (a paraphrase is not)
MIN_MATCH = 4  # shorter aligned runs are chance (the letters of "chat" occur in any sentence), unless whole
_WORD = re.compile(r"\w+")


@dataclass
class Segment:
    stage: str | None  # the stage whose text this presents (content); None for chrome
    text: str
    channel: str  # "content" (presented as the model's words) | "chrome" (labels, status, metrics) | "layout"


@dataclass
class Transcript:
    """What one sink emitted, in order. A sink appends to it the very strings it writes or sends."""

    sink: str
    segments: list[Segment] = field(default_factory=list)

    def content(self, stage: str | None, text: str) -> None:
        if text:
            self.segments.append(Segment(stage, text, "content"))

    def chrome(self, text: str) -> None:
        if text:
            self.segments.append(Segment(None, text, "chrome"))

    def layout(self, text: str) -> None:
        """Whitespace between stages' texts."""
        if text.strip():
            raise ValueError(f"layout is whitespace only; {text!r} is content or chrome")
        if text:
            self.segments.append(Segment(None, text, "layout"))

    def content_text(self, stage: str | None = None) -> str:
        return "".join(s.text for s in self.segments if s.channel == "content" and (stage is None or s.stage == stage))

    def stages(self) -> list[str | None]:
        return list(dict.fromkeys(s.stage for s in self.segments if s.channel == "content"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _significant(text: str) -> tuple[str, list[int]]:
    """``text`` without whitespace, and each kept character's position in ``text``."""
    kept = [(i, ch) for i, ch in enumerate(text) if not ch.isspace()]
    return "".join(ch for _, ch in kept), [i for i, _ in kept]


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group().casefold(), m.start(), m.end()) for m in _WORD.finditer(text)]


def echo_mask(text: str, kit_prompts: Iterable[str], n: int = ECHO_WORDS) -> list[bool]:
    """Per character of ``text``: True where it lies in a run of ``n`` words that also occurs in a kit prompt."""
    shingles = set()
    for prompt in kit_prompts:
        words = [w for w, _, _ in _words(prompt)]
        shingles.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    mask = [False] * len(text)
    words = _words(text)
    for i in range(len(words) - n + 1):
        if tuple(w for w, _, _ in words[i:i + n]) in shingles:
            for j in range(words[i][1], words[i + n - 1][2]):
                mask[j] = True
    return mask


def prompt_echo_chars(run: RunRecord) -> int:
    """Non-whitespace characters of the run's visible model output that reproduce its kit prompts."""
    total = 0
    for stage in run.stages:
        if stage.visible:
            text = stage.call.text
            total += sum(1 for ch, echo in zip(text, echo_mask(text, run.kit_prompts)) if echo and not ch.isspace())
    return total


def decision_compliance(run: RunRecord) -> float | None:
    """Decisions the model made / all structured decisions of the run (None: the run had none)."""
    made = [d for d in run.decisions.values() if d.structured]
    if not made:
        return None
    return sum(d.status == "decided" for d in made) / len(made)


@dataclass
class SinkCompliance:
    sink: str
    compliance: float | None  # None: the sink showed no content
    content_chars: int  # non-whitespace characters of content
    model_chars: int  # of those, matching the model's output in order, not echoing a kit prompt
    kit_chars: int  # content_chars - model_chars: written by the sink or echoed kit prompt text
    prompt_echo_chars: int  # of the matching characters, those that echo a kit prompt
    chrome_chars: int  # labels, status and metrics the sink showed apart from the content
    stages: dict[str, dict[str, int]] = field(default_factory=dict)  # per stage: content, model, echo chars

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sink_compliance(run: RunRecord, transcript: Transcript) -> SinkCompliance:
    """Align the transcript's content, stage by stage, against the run's model output (see module docs)."""
    outputs: dict[str, str] = {}
    for s in run.stages:  # a retried structured stage is recorded as NAME.retry; the shown text is NAME's
        outputs.setdefault(s.name, s.call.text)
    total = model = echo = 0
    per_stage: dict[str, dict[str, int]] = {}
    for stage in transcript.stages():
        shown, _ = _significant(transcript.content_text(stage))
        source = outputs.get(stage or "", "")
        wrote, where = _significant(source)
        mask = echo_mask(source, run.kit_prompts)
        matched = echoed = 0
        if shown and wrote:
            for a, _b, size in difflib.SequenceMatcher(None, wrote, shown, autojunk=False).get_matching_blocks():
                if size < MIN_MATCH and size not in (len(shown), len(wrote)):
                    continue
                matched += size
                echoed += sum(mask[where[k]] for k in range(a, a + size))
        per_stage[str(stage)] = {"content_chars": len(shown), "model_chars": matched - echoed, "echo_chars": echoed}
        total += len(shown)
        model += matched - echoed
        echo += echoed
    chrome = sum(len(_significant(s.text)[0]) for s in transcript.segments if s.channel == "chrome")
    return SinkCompliance(sink=transcript.sink, compliance=(model / total) if total else None, content_chars=total,
                          model_chars=model, kit_chars=total - model, prompt_echo_chars=echo, chrome_chars=chrome,
                          stages=per_stage)


def output_compliance(run: RunRecord) -> float | None:
    """The run's own figure, before any sink: the share of its visible model output that is not an echo of the
    kit's prompts (None: nothing visible). A sink's figure (:func:`sink_compliance`) can only be lower."""
    total = sum(len(_significant(s.call.text)[0]) for s in run.stages if s.visible)
    if total == 0:
        return None
    return (total - prompt_echo_chars(run)) / total


__all__ = ["ECHO_WORDS", "Segment", "SinkCompliance", "Transcript", "decision_compliance", "echo_mask",
           "output_compliance", "prompt_echo_chars", "sink_compliance"]
