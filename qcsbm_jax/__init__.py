"""qcsbm_jax: quasi-conservative score-based generative models in JAX.

`qcsbm_jax.load(workdir)` returns a Run (api.py): jitted score, samplers, likelihood and
asymmetry of a trained or converted model. Importing the package loads nothing heavy.
"""

__version__ = "0.2.0"


def __getattr__(name: str):
    if name in ("load", "Run"):
        from qcsbm_jax import api
        return getattr(api, name)
    raise AttributeError(f"module 'qcsbm_jax' has no attribute {name!r}")
