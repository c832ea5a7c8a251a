"""Benchmarks: `python -m bench NAME [--quick] [--json FILE]` (see bench/__main__.py)."""
