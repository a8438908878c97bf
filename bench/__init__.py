"""Benchmarks that print ratios against named external tools (pgcopydb, reladiff, ...).

Each benchmark is a module run with `python -m bench.<name>`; results go to stdout (a table,
or one JSON object with `--json`), progress to stderr. Shared plumbing lives in `bench.common`.
"""
