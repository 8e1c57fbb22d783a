"""Benchmarks: each `bench/<name>.py` with a `main()` measures one thing and prints its figures.

Speed is measured here, never asserted in tests; docs/benchmarks.md records the figures and the
exact commands. `python -m bench` (what `make bench` runs) runs every benchmark in turn.
"""
