"""Measured comparisons. Run each from the repository root as a module:

    python -m benchmarks.attention          # or the Makefile's `make bench-*` targets

`benchmarks.harness` holds what they share; `benchmarks/results/` the committed results.
"""
