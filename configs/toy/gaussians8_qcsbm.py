"""gaussians8, QCSBM (docs/method.md, experiment 2). Append ':smoke' to the path for a short
CPU run."""

from qcsbm_jax.config import toy_config


def get_config(variant=None):
    return toy_config("gaussians8", "qcsbm", variant)
