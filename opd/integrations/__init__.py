"""Selective OPD on existing training libraries: `trl` (TRL's DistillationTrainer with the project's
token selection). Each module imports its library lazily at the top: importing `opd` never needs it."""
