"""Measuring inference compute on tasks nobody tuned to: generated problems with exact checkers (tasks.py), the
`ownllm eval` loop over strategies and sample counts (run.py), and its plot (plot.py, needs the `plot` extra)."""
