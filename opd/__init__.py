"""TA-OPD training: selective on-policy distillation on top of `diagnostics`.

Modules: `config` (TrainConfig), `normalization` (the two budget normalisations; the losses are
`diagnostics.losses`, the kept-position forward `diagnostics.forward.PositionLM`), `step` (selection
and the loss at the kept positions: the math of one step), `distributed` (processes under
accelerate/torchrun), `checkpoint` (atomic save/resume), `evaluation` (held-out accuracy, KL, live
gain), `memory`, `logger`, `integrations.trl` (the selection inside TRL's DistillationTrainer), and
`trainer` (the recipe, run by `taopd train`). It writes raw per-arm tables; their
statistics (the comparison table) live in `analysis.training`.
`opd` imports `diagnostics` only, never `analysis` or `taopd`.
"""
