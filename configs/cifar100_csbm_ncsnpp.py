"""cifar100, C-NCSN++ (constrained: score = -grad of 1/2 ||F / sigma||^2) (docs/method.md,
experiment 3).

Append ':small' to the path for a small network (a CPU run; docs/usage.md),
':smoke' for a short test run.
"""

from qcsbm_jax.config import image_config


def get_config(variant=None):
    return image_config("cifar100", "csbm", variant)
