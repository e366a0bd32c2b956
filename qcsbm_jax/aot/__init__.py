"""Ahead-of-time compilation for accelerators on a CPU machine (python -m qcsbm_jax.aot).

targets: the chips and slices by their rental names; programs: every program of a job;
check: compiles them and reports memory, work and estimated times; fit: the largest batch
that fits and settings that would; report: the table and the JSON.
"""
