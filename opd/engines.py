"""run_training: the arm trainer chosen by config.engine (own | trl), over the one run harness.

`opd.trainer` holds the harness (setup, each arm, raw tables, manifest) and the own engine's arm trainer;
`opd.trl_recipe` holds TRL's. This entry picks one, so neither recipe imports the other.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from opd.config import TrainConfig
from opd.trainer import run_arms, train_arm


def run_training(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run (or with `resume`, continue) every arm; returns the run directory.

    Writes the raw tables: metrics.parquet (every arm's rows) and live_gain.parquet (every arm's
    per-sequence live gain), and manifest.json; `taopd train` adds the comparison table.
    `engine: trl` trains each arm with TRL (opd/trl_recipe.py); the setup and outputs are these.
    """
    if config.engine == "trl":
        # deferred: the TRL recipe imports trl (and through it vLLM), seconds that the own engine never needs
        from opd.trl_recipe import check_trl_config, train_arm_trl, trl_manifest

        check_trl_config(config)
        return run_arms(config, resume, train_arm_trl, manifest_extra=trl_manifest(config))
    # a partial, not a lambda: side-by-side arm processes (arm_workers) receive it pickled; their bars stay off
    return run_arms(config, resume, partial(train_arm, progress=config.progress and config.arm_workers == 1))
