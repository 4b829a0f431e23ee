"""Evaluation: likelihood bounds (likelihood), sampling metrics (generation), the
lm-evaluation-harness adapter (harness, registers model "lflm" on import) and latency."""
