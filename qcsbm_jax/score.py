"""Score parameterisations: a network output f(x, c) becomes a pure score function.

Every consumer (losses, asymmetry estimators, samplers, likelihoods) sees only
`score_fn(params, x, t, key) -> score` with x: [B, *data_shape], t: [B], key a dropout key
or None. Two families (docs/method.md, "Models"), each with two output forms:

unconstrained (USBM / QCSBM): the network output is the score itself, up to scaling,
  residual: s = (x - f) / std(t)          (the paper's toy model)
  scaled:   s = f / std(t)                (U-NCSN++)
constrained (CSBM): the network defines an energy E and s = -grad_x E (conservative),
  residual: E = ||x - f||^2 / (2 std(t))  (the paper's toy model)
  scaled:   E = ||f / std(t)||^2 / 2       (C-NCSN++)
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qcsbm_jax.sde import bcast

ScoreFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]

FAMILIES = ("unconstrained", "constrained")
OUTPUTS = ("residual", "scaled")


def _unconstrained_output(f: jax.Array, x: jax.Array, std: jax.Array, output: str):
    std = bcast(std, x)
    return (x - f) / std if output == "residual" else f / std


def _energy(f: jax.Array, x: jax.Array, std: jax.Array, output: str) -> jax.Array:
    """Per-sample energy [B] of the constrained family."""
    axes = tuple(range(1, x.ndim))
    if output == "residual":
        return jnp.sum(jnp.square(x - f), axis=axes) / (2 * std)
    return 0.5 * jnp.sum(jnp.square(f / bcast(std, x)), axis=axes)


def make_energy_fn(apply_fn, sde, output: str = "scaled"):
    """Returns `energy_fn(params, x, t, key) -> [B]` of the constrained family."""
    _check(FAMILIES[1], output)

    def energy_fn(params, x, t, key=None):
        return _energy(apply_fn(params, x, sde.noise_condition(t), key), x, sde.std(t), output)

    return energy_fn


def make_score_fn(apply_fn, sde, family: str, output: str) -> ScoreFn:
    """Builds `score_fn(params, x, t, key)` from `apply_fn(params, x, condition, key)`.

    Samples in a batch never interact (no batch statistics), so the Jacobian of the
    batched score with respect to x is block diagonal: one D x D block per sample.
    """
    _check(family, output)
    if family == "constrained":
        energy_fn = make_energy_fn(apply_fn, sde, output)

        def energy_gradient(params, x, t, key=None):
            return -jax.grad(lambda y: jnp.sum(energy_fn(params, y, t, key)))(x)

        return energy_gradient

    def network_output(params, x, t, key=None):
        return _unconstrained_output(
            apply_fn(params, x, sde.noise_condition(t), key), x, sde.std(t), output)

    return network_output


def _check(family: str, output: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {family!r}.")
    if output not in OUTPUTS:
        raise ValueError(f"model.output must be one of {OUTPUTS}, got {output!r}.")
