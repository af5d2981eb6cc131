"""Benchmarks that print ratios: the toy-world convergence comparison (``convergence.py``)."""
