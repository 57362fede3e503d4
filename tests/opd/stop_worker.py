"""Two processes (gloo) where one fails in a step's local phase: `opd.nonfinite.stop_together` stops both.

Run as `torchrun --nproc_per_node 2 stop_worker.py OUT`: rank 1 raises a NonFiniteError before the next
collective (as a NaN rollout does), rank 0 has none; each rank writes OUT/rank<r>.txt with the error it stopped
with ("no stop" if it went on to the next collective).
"""

from __future__ import annotations

import sys
from pathlib import Path

from opd.distributed import World
from opd.nonfinite import stop_together
from opd.step import NonFiniteError


def main(out: str) -> None:
    world = World.create("cpu")
    err = NonFiniteError("generation logits non-finite at generated token 1") if world.rank == 1 else None
    try:
        stop_together(world, err)
        world.sum(1.0)  # the step's next collective
        message = "no stop"
    except NonFiniteError as exc:
        message = str(exc)
    Path(out, f"rank{world.rank}.txt").write_text(message)


if __name__ == "__main__":
    main(sys.argv[1])
