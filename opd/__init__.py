"""TA-OPD training: selective on-policy distillation on top of `diagnostics`.

Modules: `config` (TrainConfig), `losses` (the loss registry and normalisations), `batch` (rollout
tensors and the kept-position student forward), `distributed` (processes under accelerate/torchrun),
`checkpoint` (atomic save/resume), `evaluation` (held-out accuracy, KL, live gain), `report` (the
comparison table), `memory`, `logger`, and `trainer` (the recipe; `python -m opd.trainer`).
`opd` imports `diagnostics` only, never `analysis` or `taopd`.
"""
