"""fashion_mnist, U-NCSN++ (unconstrained) (docs/method.md, experiment 3).

Append ':small' to the path for a small network (a CPU run; docs/usage.md),
':smoke' for a short test run.
"""

from qcsbm_jax.config import image_config


def get_config(variant=None):
    return image_config("fashion_mnist", "usbm", variant)
