"""qcsbm_jax: quasi-conservative score-based generative models in JAX."""

__version__ = "0.1.0"
