"""Test set-up: eight virtual CPU devices, set before jax is imported anywhere."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The compile-only TPU/GPU compilers of launch/run.sh's set-up (tests/test_aot.py), on the
# path before JAX discovers its plugins; qcsbm_jax.aot.targets imports nothing heavy.
from qcsbm_jax.aot import targets as _aot_targets  # noqa: E402

_aot_targets.add_plugins_to_path()
