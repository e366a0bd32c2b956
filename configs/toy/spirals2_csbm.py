"""spirals2, CSBM (docs/method.md, experiment 2). Append ':smoke' to the path for a short CPU
run."""

from qcsbm_jax.config import toy_config


def get_config(variant=None):
    return toy_config("spirals2", "csbm", variant)
