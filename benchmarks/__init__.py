"""Benchmarks of the hot paths of qcsbm_jax: `python -m benchmarks.run --help`."""
