"""Models used by fmrt's runtime, tests, demos and benchmarks."""
