"""Evaluation: acceptance metrics (pure) and the benchmark runner."""
