"""Small self-contained experiments of the paper (docs/method.md, experiments 1 and 4).

gaussian_example: gradient-step sampling of N(0, 0.1^2 I) with a rotational (non-conservative)
  or a radial (conservative near the data) perturbation of the exact score.
autoencoder: a one-layer untied autoencoder score trained with the asymmetry penalty alone.

Each module is runnable: python -m qcsbm_jax.experiments.<name> --config configs/<name>.py
--workdir DIR. Importing them defines no flags and changes no JAX settings.
"""
