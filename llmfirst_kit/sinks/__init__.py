"""Sinks: what shows a run to a person (or a file), each implementing ``events.Sink`` and keeping a
transcript of what it emitted (``compliance.Transcript``)."""
