"""Progress bars that stay readable in a log: one shared `progress_bar` for every recipe.

On a terminal a tqdm bar redraws in place. When stderr is not a terminal (a `make` log, CI, a
batch job) every redraw is a new line, so a bar updated once per step writes one line per step;
there the bar refreshes at most every `LOG_INTERVAL_S` seconds (plus its first and last line), and
`quiet_library_bars` turns off the bars libraries draw on their own (transformers' weight loading).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0  # seconds between refreshes when stderr is not a terminal


def progress_bar(
    iterable: Iterable[Any], *, desc: str, enabled: bool = True, leave: bool = True, **kwargs: Any
) -> tqdm:
    """tqdm over `iterable`, off when not `enabled`, throttled when stderr is not a terminal.

    Use `bar.set_postfix(..., refresh=False)` in loops: a refreshing postfix ignores the throttle.
    """
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else LOG_INTERVAL_S)
    return tqdm(iterable, desc=desc, disable=not enabled, leave=leave, **kwargs)


def quiet_library_bars() -> None:
    """Off a terminal, silence transformers' own progress bars (one "Loading weights" bar per model load)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
