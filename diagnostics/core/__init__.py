"""core: the plumbing every command shares, no ML: config loading and overrides, atomic files, the run
directory (naming, claiming, its lock), the non-finite record, progress bars, the registry helper, and the one seed
derivation. Imports nothing of the project.
"""
