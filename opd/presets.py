"""`TrainConfig.preset`: named bundles of config values; `paper` = the released training code's choices.

A preset writes its values into the config (so config.json shows what ran). A key the user left at
its default takes the preset's value; a key set to anything else than the default or the preset's
value is an error naming the key (no silent override). Without a preset every key keeps today's
default, so default training results do not move. `optimizer: paper` fixes its own hyperparameters
the same way (`opd.optim.PAPER_ADAM`).

The `paper` preset (public repository ckjsuperhh/taopd-baseline, folder TA-OPD/):
* selection, `slime_ta_opd/slime/rollout/tip_compat.py` (`diagnostics.signals.selectors`):
  top-K proxy signals (signals: release_topk), quantiles over all response rows without eps
  (signal_normalization: all_response_rows), ties by (score, -position) (tie_break: earliest_position),
  one kept position per response at least (min_per_sequence: 1, L527), topped up by softor(H~, Norm(D C))
  (top_up: teachability_entropy_ndc, L538), a Q3 selector keeps Q3 only (q3_fill: false, L503);
* loss: the mean over each sequence's kept tokens, then over sequences (normalization:
  per_sequence_mean; the released trainer's, paper-spec section 1);
* optimizer: Megatron's Adam as launched (optimizer: paper; `opd.optim`).
It does not set lr (1e-6 on the release's Qwen3 pairs; the testbed needs its own) nor the selectors.
"""

from __future__ import annotations

import copy
import dataclasses

from diagnostics.config import check
from opd.optim import PAPER_ADAM

PRESETS: dict[str, dict[str, object]] = {
    "paper": {
        "signals": "release_topk",
        "signal_normalization": "all_response_rows",
        "tie_break": "earliest_position",
        "top_up": "teachability_entropy_ndc",
        "q3_fill": False,
        "min_per_sequence": 1,
        "normalization": "per_sequence_mean",
        "optimizer": "paper",
    },
}
# What `optimizer: paper` fixes (the optimizer's construction reads the rest from opd.optim.PAPER_ADAM).
OPTIMIZER_FIXED = {"paper": {key: PAPER_ADAM[key] for key in ("betas", "weight_decay", "max_grad_norm")}}


def _default(config, key: str):
    spec = next(f for f in dataclasses.fields(config) if f.name == key)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _impose(config, values: dict[str, object], source: str) -> None:
    for key, value in values.items():
        current = getattr(config, key)
        check(current in (value, _default(config, key)), key,
              f"{source} sets it to {value!r}; got {current!r} (leave it at its default, or drop {source})")
        setattr(config, key, copy.deepcopy(value))  # no list shared with the preset table


def apply_presets(config) -> None:
    """Write `config.preset`'s values, then `config.optimizer`'s fixed hyperparameters, into `config`."""
    check(config.preset in ("", *PRESETS), "preset", f"must be '' or one of {list(PRESETS)}, got {config.preset!r}")
    if config.preset:
        _impose(config, PRESETS[config.preset], f"preset: {config.preset}")
    if config.optimizer in OPTIMIZER_FIXED:
        _impose(config, OPTIMIZER_FIXED[config.optimizer], f"optimizer: {config.optimizer}")
