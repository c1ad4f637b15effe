"""A live, staged view of a pipeline run for Jupyter (ipywidgets); what it costs: ``llmfirst bench view``
(:mod:`llmfirst_kit.bench.view`).

The view is a sink: it only consumes the pipeline's events. Every time it shows comes from the events'
``t_ns`` (taken by the pipeline before any sink runs) or from the records, never from a clock of its own,
so attaching it cannot change a measured latency. (The one exception is the "elapsed" counter of a stage
still streaming, which is display only.)

Why updates are batched: a widget resends its whole value on every change, so a text widget updated on
every token costs O(n^2) bytes and one frontend message per token. The view applies events to plain
Python state and flushes the changed widgets on a timer. Each message sent (a widget value change, or
the comms a new panel opens) costs ``flush_interval_s`` (60 ms) before the next flush: ~16 messages a
second whatever the token rate. The final update is always sent at once.

Two ways to run:

- ``record = await view.run(pipe, query)``: awaits the run in the cell. Works headless (papermill,
  nbval, nbclient), where a cell's output is only kept while the cell runs.
- ``task = view.start(pipe, query)``: a background task; the cell ends at once and the view keeps
  updating in a live page. ``await task`` gives the record. Headless, the final rendering is only saved
  if the task is awaited in the cell that started it (the kernel tags its output with that cell).

Stop (the button, or ``view.stop()``) cancels the task consuming the run: the pipeline stops decoding
within one token step and keeps the partial record with status ``cancelled``; the view marks the
stage(s) that were stopped. Checked on ipykernel 7.4 (tests/test_notebook.py): a click is handled even
while a cell awaits ``view.run``. A kernel that handles one message at a time would see the click only
once the cell ends; ``start`` works in either case.

At the end the displayed widget is replaced (through its display handle) by a static HTML rendering of
the same panels plus a metrics table, so a saved notebook shows the final text and metrics instead of
a widget placeholder.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets

from ..compliance import SinkCompliance, Transcript, sink_compliance
from ..events import Decision, Error, Event, RunEnd, StageEnd, StageStart, Token
from ..metrics import DEFAULT_SLO, NS, SLO, RunMetrics, call_metrics, calls_frame, decode_tps, run_metrics, ttft_s
from ..records import CallRecord, RunRecord

# Every frontend message (a widget value change, a new panel's comms) costs one interval of the budget:
# at most ~16 messages a second, so that even a short run stays under 20 a second with its final burst.
FLUSH_INTERVAL_S = 0.06


@dataclass
class _Panel:
    """What the view knows about one model call (one stage, or its retry), built from events only."""

    stage: str
    call_id: str
    model: str
    visible: bool
    start_ns: int  # the StageStart event's t_ns
    retry: bool = False
    parts: list[str] = field(default_factory=list)
    chunk_ns: list[int] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end: StageEnd | None = None
    final: CallRecord | None = None  # the call's record, set when the run is over: the source of truth
    stopped: bool = False
    widget: widgets.HTML | None = None
    raw_choice: bool = False  # its text is a choice before calibration: the decision (in the header) differs

    @property
    def text(self) -> str:
        return self.final.text if self.final is not None else "".join(self.parts)

    def figures(self, now_ns: int) -> dict[str, Any]:
        """TTFT, tokens/s, tokens and elapsed seconds. Exact call metrics once the stage has ended (from
        the StageEnd event; once the run is over, from the call's record, which also covers a stopped
        stage). While it streams: the same formulas on the chunks seen so far, timed from the StageStart
        event (which precedes the request start by the prompt preparation)."""
        if self.end is not None or self.final is not None:
            m = call_metrics(self.final) if self.final is not None else self.end.metrics
            end_ns = self.end.t_ns if self.end is not None else (self.final.end_ns or now_ns)
            return {"ttft_s": m.ttft_s, "tokens_per_s": m.tokens_per_s, "tokens": m.output_tokens,
                    "elapsed_s": (end_ns - self.start_ns) / NS}
        live = CallRecord.model_construct(call_id=self.call_id, backend="", model=self.model,  # a view: unchecked
                                          start_ns=self.start_ns, chunk_ns=self.chunk_ns,
                                          chunk_tokens=self.chunk_tokens, output_tokens=sum(self.chunk_tokens))
        return {"ttft_s": ttft_s(live), "tokens_per_s": decode_tps(live), "tokens": live.output_tokens,
                "elapsed_s": (now_ns - self.start_ns) / NS}


class LiveView:
    """A :class:`~llmfirst_kit.events.Sink` for Jupyter. One panel per stage with its text growing live, a header per stage (TTFT, tokens/s, elapsed), the
    model's decisions, and a Stop button. Shows one run; make a new view for the next run.

    ``show``: display the view (``None``: only inside a Jupyter kernel). ``messages`` counts the
    frontend messages the view caused (widget value changes and display updates).
    """

    name = "live_view"

    def __init__(self, *, flush_interval_s: float = FLUSH_INTERVAL_S, show: bool | None = None):
        self.flush_interval_s = flush_interval_s
        self.messages = 0
        self.record: RunRecord | None = None
        self.status = "waiting"  # waiting -> streaming -> done | cancelled | failed (RUN_STATUS)
        self.stopped_stages: list[str] = []
        self.decisions: list[Decision] = []
        self.errors: list[Error] = []
        self.run_metrics: RunMetrics | None = None
        self._show = _in_kernel() if show is None else show
        self._panels: dict[str, _Panel] = {}
        self._stage_order: dict[str, int] = {}  # the pipeline's stage order, when the view runs it
        self._slo: SLO = DEFAULT_SLO
        self._dirty: set[str] = set()
        self._header_dirty = False
        self._next_flush = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[RunRecord] | None = None
        self._stop_requested = False
        self._display: Any = None
        self._finished = False

        self.header = widgets.HTML(value=self._header_html())
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger",
                                          layout=widgets.Layout(width="90px"))
        self.stop_button.on_click(lambda _button: self.stop())
        self.stages_box = widgets.VBox([])
        self.widget = widgets.VBox([widgets.HBox([self.stop_button, self.header]), self.stages_box])

    # ------------------------------------------------------------------------------------ running

    def start(self, pipeline: Any, query: str, **run_options: Any) -> "asyncio.Task[RunRecord]":
        """Run ``pipeline`` on ``query`` in a background task, showing it live; the task's result is the
        run record (status ``cancelled`` if stopped). ``run_options`` go to ``pipeline.start``."""
        if self._task is not None:
            raise RuntimeError("a LiveView shows one run; make a new LiveView for the next run")
        run = pipeline.start(query, **run_options)  # input errors surface here, before any display
        self._stage_order = {stage.name: i for i, stage in enumerate(pipeline.stages)}
        self._slo = getattr(pipeline, "slo", DEFAULT_SLO)
        self.record = run.record
        self.show()
        self._task = asyncio.ensure_future(self._consume(run))
        return self._task

    async def run(self, pipeline: Any, query: str, **run_options: Any) -> RunRecord:
        """Run ``pipeline`` on ``query`` in this cell, showing it live; returns the run record."""
        return await self.start(pipeline, query, **run_options)

    def stop(self) -> None:
        """Cancel the run (the Stop button calls this). The partial record is kept."""
        if self._task is not None and not self._task.done():
            self._stop_requested = True
            self._task.cancel()

    async def _consume(self, run: Any) -> RunRecord:
        try:
            async for event in run:
                self.handle(event)
        except asyncio.CancelledError:
            # The run's own cleanup has finished here: its record says what happened (``cancelled``).
            self._finish(run.record, stopped=True)
            if not self._stop_requested:
                raise  # cancelled from outside (e.g. a kernel interrupt): let it propagate
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        return run.record

    # ------------------------------------------------------------------------------------- events

    def handle(self, event: Event) -> None:
        """Apply one pipeline event. Usable as a sink on its own: ``pipe.run(q, on_event=view.handle)``."""
        if self.status == "waiting":  # the run has begun: every event before its end belongs to a streaming run
            self.status = "streaming"
            self._header_dirty = True
        if isinstance(event, Token):
            p = self._panels.get(event.call_id)
            if p is not None:
                p.parts.append(event.text)
                p.chunk_ns.append(event.t_ns)
                p.chunk_tokens.append(event.tokens if event.tokens is not None else 1)
                self._dirty.add(event.call_id)
        elif isinstance(event, StageStart):
            retry = any(p.stage == event.stage for p in self._panels.values())
            p = _Panel(stage=event.stage, call_id=event.call_id, model=event.model, visible=event.visible,
                       start_ns=event.t_ns, retry=retry, widget=widgets.HTML())
            self._panels[event.call_id] = p
            # panels in the pipeline's stage order (overlapping stages may start in another order)
            last = len(self._stage_order)
            panels = sorted(self._panels.values(), key=lambda q: self._stage_order.get(q.stage, last))
            self.stages_box.children = tuple(q.widget for q in panels)
            self._charge(_comms_opened(p.widget) + 1)  # and the box's children changed
            self._dirty.add(event.call_id)
            self._header_dirty = True
        elif isinstance(event, StageEnd):
            p = self._panels.get(event.call_id)
            if p is not None:
                p.end = event
                self._dirty.add(event.call_id)
        elif isinstance(event, Decision):
            self.decisions.append(event)
            self._header_dirty = True
            p = self._panels.get(event.call_id)
            if p is not None and event.calibration:
                p.raw_choice = True
                self._dirty.add(event.call_id)
        elif isinstance(event, Error):
            self.errors.append(event)
            self._header_dirty = True
        elif isinstance(event, RunEnd):
            self.run_metrics = event.metrics
            self._finish(event.record, stopped=event.status == "cancelled")
            return
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._timer is not None or self._finished:
            return
        delay = max(0.0, self._next_flush - time.monotonic())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # events replayed without a loop: flush when due, the final flush does the rest
            if delay == 0:
                self._flush()
            return
        self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        """Push every changed value to the widgets (one message per widget that changed)."""
        self._timer = None
        sent = 0
        now_ns = time.perf_counter_ns()
        for call_id in sorted(self._dirty):
            p = self._panels[call_id]
            sent += _assign(p.widget, _panel_html(p, now_ns))
        self._dirty.clear()
        if self._header_dirty:
            sent += _assign(self.header, self._header_html())
            self._header_dirty = False
        self._charge(sent)

    def _charge(self, messages: int) -> None:
        """Count messages sent and push the next flush back by one interval for each."""
        self.messages += messages
        self._next_flush = max(self._next_flush, time.monotonic()) + messages * self.flush_interval_s

    def _finish(self, record: RunRecord, *, stopped: bool) -> None:
        """The final update: always sent, whatever the rate limit; then the static rendering."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.record = record
        self.status = RUN_STATUS.get(record.status, record.status)
        if self.run_metrics is None:
            self.run_metrics = run_metrics(record, self._slo)  # a stopped run has no RunEnd event
        calls = {s.call.call_id: s.call for s in record.stages}
        for p in self._panels.values():
            # Chunks still queued when a run is stopped never reached the view; the record has them.
            p.final = calls.get(p.call_id)
            if stopped and p.end is None:
                p.stopped = True
                self.stopped_stages.append(p.stage)
        self._dirty.update(self._panels)
        self._header_dirty = True
        self._flush()
        if not self.stop_button.disabled:
            self.stop_button.disabled = True
            self.messages += 1
        if self._display is not None:
            from IPython.display import HTML

            self._display.update(HTML(self.summary_html()))
            self.messages += 1

    # ------------------------------------------------------------------------------------ display

    def show(self) -> None:
        """Display the view through a display handle (which the end of the run updates)."""
        if self._show and self._display is None:
            from IPython.display import display

            self._display = display(self.widget, display_id=True)

    def rendered_texts(self) -> list[tuple[str, bool, str]]:
        """(stage, shown to the user, text) of each panel as its widget renders it now (read back from the
        widget's HTML, in display order): what a person sees, not what the view meant to show."""
        out = []
        by_widget = {id(p.widget): p for p in self._panels.values()}
        for w in self.stages_box.children:
            p = by_widget[id(w)]
            body = w.value.split(_BODY_OPEN, 1)[-1].rsplit(_BODY_CLOSE, 1)[0] if _BODY_OPEN in w.value else ""
            out.append((p.stage, p.visible, html.unescape(body)))
        return out

    @property
    def transcript(self) -> Transcript:
        """What the view emitted: the shown panels' rendered text is content; the header (metrics, decisions,
        errors) and the internal panels' text, marked internal, are chrome."""
        t = Transcript(self.name)
        t.chrome(html.unescape(self.header.value))
        for stage, visible, text in self.rendered_texts():
            if visible:
                t.content(stage, text)
            else:
                t.chrome(text)
        return t

    def compliance(self) -> SinkCompliance | None:
        """This view's LLM-first compliance (``compliance.sink_compliance``), once it shows a run."""
        return sink_compliance(self.record, self.transcript) if self.record is not None else None

    def texts(self) -> dict[str, str]:
        """The text of each panel, by call id: what the next flush sends; after the run, what is shown."""
        return {call_id: p.text for call_id, p in self._panels.items()}

    def widget_html(self, call_id: str) -> str:
        """The HTML the panel's widget holds now (what the frontend was last sent)."""
        return self._panels[call_id].widget.value

    def summary_html(self) -> str:
        """The whole view as static HTML: header, decisions, every panel, and the stage metrics table."""
        panels = "".join(w.value for w in self.stages_box.children)
        table = ""
        if self.record is not None and self.record.stages:
            table = stages_frame(self.record).to_html(index=False, float_format=lambda v: f"{v:.3f}",
                                                      na_rep="", border=0)
        return f"<div>{self._header_html()}{panels}{table}</div>"

    def _repr_html_(self) -> str:
        return self.summary_html()

    def _header_html(self) -> str:
        rec = self.record
        bits = [f"<b>{html.escape(rec.preset)}</b>" if rec else "", _badge(self.status)]
        if rec is not None:
            bits.append(html.escape(str(rec.labels.get("model", ""))))
        m = self.run_metrics
        if m is not None:
            own = self.compliance() if self._finished else None  # this view's figure, from what it rendered
            bits += [f"user TTFT {_s(m.user_ttft_s)}", f"E2E {_s(m.e2e_s)}",
                     f"answer TPOT {_ms(m.answer_tpot_s)}", f"{m.output_tokens} tokens",
                     f"model calls {m.model_calls}",
                     f"compliance {_num(own.compliance if own else None)}",
                     f"prompt echo {m.prompt_echo_chars} chars",
                     f"decisions by the model {_num(m.decision_compliance)}"]
            if m.quality is not None:
                bits.append(f"quality {m.quality}")
            if rec is not None and rec.status not in ("ok", "running"):  # no verdict for what did not finish
                bits.append(f"run {html.escape(rec.status)}: no SLO verdict")
            else:
                bits.append("SLO " + " ".join(f"{k} {_verdict(v)}" for k, v in m.slo.as_dict().items()))
        lines = [" · ".join(b for b in bits if b)]
        if self.stopped_stages:
            lines.append("stopped during stage " + ", ".join(f"<b>{html.escape(s)}</b>"
                                                             for s in self.stopped_stages))
        for d in self.decisions:
            if d.status == "decided":
                how = f" — {html.escape(d.how())}" if d.how() else ""
                lines.append(f"decision <b>{html.escape(d.name)}</b> (by the model, stage "
                             f"{html.escape(d.stage)}): {_decision_text(d.value)}{how}")
            else:
                lines.append(f"decision <b>{html.escape(d.name)}</b>: <span style='color:#c80'>undecided</span> "
                             f"(the model's output failed twice, stage {html.escape(d.stage)}); the kit's default "
                             f"is used: {_decision_text(d.used)}")
        for e in self.errors:
            lines.append(f"<span style='color:#b00'>error {html.escape(e.code)} in stage "
                         f"{html.escape(str(e.stage))}: {html.escape(e.message)}</span>")
        return "<div style='font-family:monospace;font-size:12px;line-height:1.5'>" + "<br>".join(lines) + "</div>"


def _assign(widget: widgets.HTML, value: str) -> int:
    """Set a widget's value if it changed; returns the number of frontend messages (0 or 1)."""
    if widget.value == value:
        return 0
    widget.value = value
    return 1


def _comms_opened(widget: widgets.Widget) -> int:
    """A new widget opens one comm, plus one for each sub-widget (layout, style) it creates."""
    return 1 + sum(isinstance(getattr(widget, k, None), widgets.Widget) for k in widget.keys)


def _panel_html(p: _Panel, now_ns: int) -> str:
    f = p.figures(now_ns)
    state = "stopped" if p.stopped else (p.end.status if p.end is not None else "streaming")
    title = html.escape(p.stage) + (" (retry)" if p.retry else "")
    head = " · ".join([
        f"<b>{title}</b>", _badge(state), html.escape(p.model),
        "shown to the user" if p.visible else "internal",
        *(["the model's raw next-token choice, before calibration: the decision is in the header"]
          if p.raw_choice else []),
        f"TTFT {_s(f['ttft_s'])}", f"{_num(f['tokens_per_s'], 1)} tok/s", f"{f['tokens']} tokens",
        f"{f['elapsed_s']:.2f} s",
    ])
    border = "#4a90d9" if p.visible else "#bbb"
    return (f"<div style='border-left:3px solid {border};padding:2px 8px;margin:6px 0'>"
            f"<div style='font-family:monospace;font-size:12px;color:#555'>{head}</div>"
            f"{_BODY_OPEN}{html.escape(p.text)}{_BODY_CLOSE}")


_BODY_OPEN, _BODY_CLOSE = "<div style='white-space:pre-wrap'>", "</div></div>"  # a panel's text, between these


RUN_STATUS = {"ok": "done", "cancelled": "cancelled", "error": "failed"}  # a record's status as the view says it


def _badge(state: str) -> str:
    colour = {"ok": "#2a7", "done": "#2a7", "running": "#48c", "streaming": "#48c", "cancelled": "#c80",
              "stopped": "#c80", "error": "#b00", "failed": "#b00"}.get(state, "#777")
    return f"<span style='color:{colour}'>{html.escape(state)}</span>"


def _decision_text(value: Any) -> str:
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            v = "; ".join(map(str, v)) if isinstance(v, list) else v
            parts.append(f"{html.escape(str(k))} = <b>{html.escape(str(v))}</b>")
        return ", ".join(parts)
    return html.escape(json.dumps(value, ensure_ascii=False))


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} s"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.1f} ms"


def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _verdict(v: bool | None) -> str:
    return {True: "met", False: "missed", None: "–"}[v]


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def stages_frame(record: RunRecord):
    """One row per model call of a run, with its stage name: the metrics table of the view."""
    frame = calls_frame([s.call for s in record.stages])
    frame.insert(0, "stage", [s.name for s in record.stages])
    frame.insert(1, "shown", [s.visible for s in record.stages])
    cols = ["stage", "shown", "model", "status", "ttft_s", "tpot_s", "e2e_s", "output_tokens", "tokens_per_s"]
    return frame[cols]


async def live(pipeline: Any, query: str, **run_options: Any) -> RunRecord:
    """``await live(pipe, query)``: run in a new :class:`LiveView`, in this cell; returns the record."""
    return await LiveView().run(pipeline, query, **run_options)


__all__ = ["FLUSH_INTERVAL_S", "LiveView", "live", "stages_frame"]
