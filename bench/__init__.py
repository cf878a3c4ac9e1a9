"""The aibridge benchmark: ``python -m bench`` (see BENCHMARKS.md)."""
