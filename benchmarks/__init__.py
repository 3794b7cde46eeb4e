"""Benchmarks: ``python -m benchmarks.<name>`` prints a table (see each module)."""
