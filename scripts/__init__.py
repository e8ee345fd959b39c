"""The benchmarks and checks a user runs (``python scripts/NAME.py --help``); a package so that
tests and ``scripts/experiments/`` import them as ``scripts.NAME``."""
