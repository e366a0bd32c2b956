"""Denoising score matching plus the quasi-conservative penalty (PAPER.md, "Models").

For x0 ~ data, t ~ U(eps, 1), z ~ N(0, I), x_t = mean(x0, t) + std(t) z:

  L_DSM = E[ 1/2 lambda(t) ||s(x_t, t) + z / std(t)||^2 ]
          lambda = std^2 ('sigma2', Song et al. 2021) or g(t)^2 ('likelihood')
  L     = L_DSM + qc_weight * E[ std(t)^2 * Asym_estimate(x_t, t) ]

The penalty is evaluated at the same x_t and t as the DSM term, and the score value of its
primal pass is the one the DSM term uses (one network evaluation serves both).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from qcsbm_jax import asymmetry
from qcsbm_jax.score import ScoreFn

WEIGHTINGS = ("sigma2", "likelihood")


def _per_sample(a: jax.Array, x: jax.Array) -> jax.Array:
    return a.reshape(a.shape + (1,) * (x.ndim - 1))


def dsm_per_sample(score: jax.Array, z: jax.Array, std: jax.Array,
                   weight: jax.Array) -> jax.Array:
    """1/2 weight ||score + z/std||^2 per sample; score, z: [B, *S]; std, weight: [B]."""
    residual = score + z / _per_sample(std, z)
    return 0.5 * weight * jnp.sum(jnp.square(residual), axis=tuple(range(1, z.ndim)))


def make_loss_fn(score_fn: ScoreFn, sde, *, weighting: str = "sigma2",
                 qc_weight: float = 0.0, estimator: str = "nonneg",
                 probe: str = "rademacher", num_probes: int = 1,
                 eps: float = 1e-5) -> Callable:
    """Returns `loss_fn(params, x0, key) -> (loss, metrics)` for a batch x0 [B, *S].

    metrics: 'loss', 'dsm' and, when qc_weight > 0, 'qc' (the mean unweighted penalty).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if estimator not in asymmetry.ESTIMATORS:
        raise ValueError(
            f"loss.estimator must be one of {asymmetry.ESTIMATORS}, got {estimator!r}.")

    def loss_fn(params, x0, key):
        t_key, z_key, dropout_key, probe_key = jax.random.split(key, 4)
        t = jax.random.uniform(t_key, (x0.shape[0],), minval=eps, maxval=1.0)
        z = jax.random.normal(z_key, x0.shape, x0.dtype)
        mean, std = sde.marginal_mean_std(x0, t)
        x_t = mean + _per_sample(std, x0) * z

        def field(x, times):
            return score_fn(params, x, times, dropout_key)

        if qc_weight > 0:
            score, penalty = asymmetry.asymmetry_penalty(
                field, x_t, t, probe_key, estimator=estimator, probe=probe,
                num_probes=num_probes)
        else:
            score = field(x_t, t)
        weight = jnp.square(std) if weighting == "sigma2" else jnp.square(sde.sde(x_t, t)[1])
        dsm = jnp.mean(dsm_per_sample(score, z, std, weight))
        metrics = {"dsm": dsm}
        loss = dsm
        if qc_weight > 0:
            metrics["qc"] = jnp.mean(penalty)
            loss = dsm + qc_weight * jnp.mean(jnp.square(std) * penalty)
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn
