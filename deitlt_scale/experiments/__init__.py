"""Experiment grids: teachers, rows and seeds declared in YAML, run here or on SLURM, reported."""
