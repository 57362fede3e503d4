"""diagnostics.core.progress: bars throttled when stderr is not a terminal, off when disabled."""

from __future__ import annotations

import io
import sys

from diagnostics.core.progress import LOG_INTERVAL_S, progress_bar


def test_bar_is_throttled_off_a_terminal(monkeypatch):
    stream = io.StringIO()  # not a TTY, like a make log
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(range(500), desc="steps", file=stream)
    assert bar.mininterval == LOG_INTERVAL_S
    for _ in bar:
        bar.set_postfix(loss=1.0, refresh=False)
    assert stream.getvalue().count("steps") <= 3  # first line, maybe one refresh, the last line
    assert progress_bar(range(3), desc="off", enabled=False).disable
