"""Training loggers: a console logger on rank 0, a no-op logger everywhere else (nanochat's DummyWandb).

The trainer calls `logger.log(row)` once per step and `logger.info(text)` for messages, with no
`if rank == 0` branches: `make_logger` hands the no-op object to the processes that stay silent.
"""

from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm


def _write(text: str) -> None:
    """Above the progress bars on a terminal; a plain line in a log (tqdm.write redraws every bar there)."""
    if sys.stderr.isatty():
        tqdm.write(text)
    else:
        print(text, file=sys.stderr, flush=True)


class NullLogger:
    """Accepts everything, prints nothing."""

    def log(self, row: dict) -> None:
        pass

    def info(self, text: str) -> None:
        pass


class ConsoleLogger(NullLogger):
    """One line per evaluated step and every message, written through tqdm (bars stay intact)."""

    def log(self, row: dict) -> None:
        if math.isnan(row.get("accuracy", math.nan)):
            return
        _write(
            f"[{row['selector']} r={row['ratio']:g} seed={row['seed']}] step {row['step']:>4}  "
            f"loss {row['loss']:+.4f}  kept {row['kept_tokens']:>5}  acc {row['accuracy']:.3f}  "
            f"KL(T||S) {row['kl_to_teacher']:.4f}  {row['wall_time_s']:.0f}s"
        )

    def info(self, text: str) -> None:
        _write(text)


def make_logger(is_main: bool, enabled: bool = True) -> NullLogger:
    """The console logger on the main process when enabled, else the no-op one."""
    return ConsoleLogger() if is_main and enabled else NullLogger()
