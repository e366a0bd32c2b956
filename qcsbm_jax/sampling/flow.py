"""Probability-flow ODE sampling with the adaptive in-graph RK45 solver (qcsbm_jax.ode).

Shapes: a batch is [B, *data_shape]; score_fn(params, x [B, *], t [B], key) -> [B, *].
Each sample is solved on its own (its own steps and NFE), so nothing mixes samples.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from qcsbm_jax import ode
from qcsbm_jax.sampling.pc import tweedie_denoise


def probability_flow_drift(score_fn, sde, params) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """drift(t scalar, x [*data_shape]) -> dx/dt [*data_shape] of the probability-flow ODE
    for one sample: score_fn sees a batch of one (x[None], t[None]) and key None."""

    def drift(t, x):
        xb, tb = x[None], jnp.reshape(t, (1,)).astype(x.dtype)
        return sde.reverse_drift(score_fn(params, xb, tb, None), xb, tb,
                                 probability_flow=True)[0]

    return drift


def ode_sample_from_prior(params, z: jax.Array, *, score_fn, sde, rtol: float = 1e-5,
                          atol: float = 1e-5, eps: float = 1e-3,
                          max_steps: int = ode.DEFAULT_MAX_STEPS, denoise: bool = False):
    """Integrates the probability-flow ODE from T to eps for each prior draw z [B, *].

    Each sample is solved on its own (vmap of ode.solve): its own steps and its own NFE.
    denoise: apply tweedie_denoise at eps (one more score evaluation, counted in nfe).
    Returns (x [B, *], nfe [B] int32). Rows where the solver failed (ode.solve: max_steps
    attempts used or the step size underflowed) are NaN.
    """
    drift = probability_flow_drift(score_fn, sde, params)

    def one(z0):
        x, nfe = ode.solve(drift, z0, sde.T, eps, rtol=rtol, atol=atol, max_steps=max_steps)
        if denoise:
            t = jnp.full((1,), eps, x.dtype)
            x = tweedie_denoise(sde, score_fn(params, x[None], t, None), x[None], t)[0]
        return x, nfe + int(denoise)

    return jax.vmap(one)(z)


def ode_sample(key: jax.Array, params, *, score_fn, sde, shape: tuple[int, ...],
               rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3,
               max_steps: int = ode.DEFAULT_MAX_STEPS, denoise: bool = False):
    """Probability-flow ODE samples from a prior draw [*shape] = (B, *data_shape) with key.

    Returns (x [*shape], nfe [B] int32); see ode_sample_from_prior.
    """
    return ode_sample_from_prior(params, sde.prior_sample(key, shape), score_fn=score_fn,
                                 sde=sde, rtol=rtol, atol=atol, eps=eps, max_steps=max_steps,
                                 denoise=denoise)
