"""core: the plumbing every command shares: config loading and overrides, atomic files, the run directory (naming,
claiming, its lock), the non-finite record and its finders, progress bars, the registry helper, and the one seed
derivation. No models: torch appears only to find NaN/inf in tensors (`nonfinite`). Imports nothing of the project.
"""
