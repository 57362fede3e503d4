"""TA-OPD training: selective on-policy distillation on top of `diagnostics`.

The entry is `engines.run_training` (`taopd train`), which picks the arm trainer by `engine`: the own one in
`trainer` (the run harness: setup, each arm, raw tables, manifest) or TRL's in `trl_recipe` (each arm trained by
`integrations.trl.SelectiveDistillationTrainer`). The math of one step is `step` (selection and the loss at the
kept positions; the losses are `diagnostics.losses`, the two budget normalisations `normalization`). Around it:
`config` (TrainConfig and the `paper` preset), `optim`, `rollout_engine` (hf or colocated vLLM rollouts),
`monitor` (held-out accuracy, KL and live gain during training), `checkpoint`, `nonfinite`, `distributed`,
`memory`, `logger`. `paper_protocol` is `taopd diagnose protocol=paper`; `evaluate` and `downstream` are
`taopd evaluate`. It writes raw per-arm tables; their statistics live in `analysis.training`.
`opd` imports `diagnostics` only, never `analysis` or `taopd`.
"""
