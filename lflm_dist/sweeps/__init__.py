"""Compute-scaling sweeps: IsoFLOP plans, Submitit runs, held-out bits per character, scaling-law
fits and reports (docs/sweeps.md; entry point launchers/sweep.py)."""
