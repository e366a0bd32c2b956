"""Log-likelihoods by the probability-flow ODE, bits per dimension and dequantization.

Along the probability-flow ODE dx/dt = f~(x, t) (instantaneous change of variables,
Chen et al. 2018): d log p_t(x_t)/dt = -div f~(x_t, t), so for x at time eps

  log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt,

with log p_T replaced by the prior. The state (x_t, int div) is integrated per sample.
"""

import math

import jax
import jax.numpy as jnp

from qcsbm_jax import ode
from qcsbm_jax.sampling.flow import probability_flow_drift

DIVERGENCES = ("exact", "hutchinson")


def _exact_divergence(drift, x, t):
    """(drift(t, x), trace of d drift/dx) from one jvp per data dimension; x [*S]."""
    out, jvp = jax.linearize(lambda y: drift(t, y), x)
    dims = x.size
    basis = jnp.eye(dims, dtype=x.dtype).reshape((dims, *x.shape))
    columns = jax.vmap(jvp)(basis).reshape(dims, dims)
    return out, jnp.trace(columns)


def _hutchinson_divergence(drift, x, t, v):
    """(drift(t, x), v^T (d drift/dx) v) from one jvp; x, v [*S]."""
    out, jv = jax.jvp(lambda y: drift(t, y), (x,), (v,))
    return out, jnp.sum(v * jv)


def ode_log_likelihood(params, x: jax.Array, *, score_fn, sde, divergence: str = "exact",
                       probes: jax.Array | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                       eps: float = 1e-5, max_steps: int = ode.DEFAULT_MAX_STEPS):
    """Negative log-likelihood of x [B, *S] under the model's p_eps, in nats.

    divergence: 'exact' (trace of the Jacobian, one jvp per dimension of S: small data
      only; probes must be None) or 'hutchinson' (v^T J v with probes[b] for sample b,
      fixed for the whole solve; unbiased when E[v v^T] = I).
    probes: [B, *S], e.g. asymmetry.sample_probes drawn per example from a key derived
      from the example's index, so that a sample's value does not depend on its batch.
    Each sample is integrated from eps to T on its own (ode.solve under vmap), with
    score_fn called on a batch of one and key None.
    Returns (nll [B], z [B, *S] the ODE image at T, nfe [B] int32: evaluations of the
    ODE right-hand side, each one network evaluation with its jvps). Rows where the solver
    failed (max_steps attempts used or step size underflow) have NaN nll and z.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
    if (divergence == "hutchinson") != (probes is not None):
        raise ValueError("Pass probes [B, *S] with divergence='hutchinson', and only then "
                         f"(got divergence={divergence!r}, probes "
                         f"{'given' if probes is not None else 'None'}).")
    if probes is not None and probes.shape != x.shape:
        raise ValueError(f"probes must have the shape of x {x.shape}; got {probes.shape}.")
    drift = probability_flow_drift(score_fn, sde, params)

    def one(x0, v):
        def rhs(t, state):
            y, _ = state
            if v is None:
                return _exact_divergence(drift, y, t)
            return _hutchinson_divergence(drift, y, t, v)

        (z, integral), nfe = ode.solve(rhs, (x0, jnp.zeros((), x0.dtype)), eps, sde.T,
                                       rtol=rtol, atol=atol, max_steps=max_steps)
        return z, integral, nfe

    if probes is None:
        z, integral, nfe = jax.vmap(lambda x0: one(x0, None))(x)
    else:
        z, integral, nfe = jax.vmap(one)(x, probes)
    return -(sde.prior_logp(z) + integral), z, nfe


def bits_per_dim(nll_nats, num_dims: int, *, data_scale: float = 1.0, num_bins: int = 256):
    """Upper bound on the discrete negative log-likelihood, in bits per dimension.

    Set-up: discrete data k in {0..num_bins-1}^D is dequantized to x = (k + u) / num_bins,
    u ~ U[0, 1)^D (uniform_dequantize), and the model's density p_y lives on
    y = data_scale * x + shift (e.g. data_scale 2, shift -1 for [-1, 1] data);
    nll_nats = -log p_y(y) per example, D = num_dims.
    Derivation: p_x(x) = p_y(y) data_scale^D (change of variables). The probability of the
    cell of k, of volume num_bins^-D, is P(k) = int_cell p_x, so by Jensen's inequality
    log P(k) = log E_u[p_x(x) num_bins^-D] >= E_u[log p_x(x)] - D log num_bins. Hence
      -log2 P(k) <= E_u[nll_nats - D log data_scale] / ln 2 + D log2 num_bins,
    and per dimension
      bpd = (nll_nats - D log data_scale) / (D ln 2) + log2 num_bins.
    The shift does not change densities. Works elementwise on arrays of nll.
    """
    return ((jnp.asarray(nll_nats) - num_dims * math.log(data_scale)) / (num_dims * math.log(2))
            + math.log2(num_bins))


def uniform_dequantize(key: jax.Array, x: jax.Array, num_bins: int = 256) -> jax.Array:
    """Maps data x in [0, 1] on the grid k / (num_bins - 1) to (k + u) / num_bins, u ~ U[0, 1)
    per entry: a sample in the cell [k / num_bins, (k + 1) / num_bins). Same shape as x."""
    k = jnp.round(x * (num_bins - 1))
    return (k + jax.random.uniform(key, x.shape, x.dtype)) / num_bins


def image_data_scale(centered: bool) -> float:
    """data_scale of bits_per_dim for images in [0, 1] (1) or centered to [-1, 1] (2)."""
    return 2.0 if centered else 1.0


def dequantize_images(keys: jax.Array, images: jax.Array, centered: bool) -> jax.Array:
    """Model inputs [B, *S] float32 from 8-bit images [B, *S] (uint8, values k in 0..255).

    Example b becomes (k + u) / 256 with u ~ U[0, 1) per entry drawn from keys[b] (keys
    [B], typed), so its noise does not depend on the batch it is in; centered maps the
    result to 2 x - 1 in [-1, 1). The density of these inputs gives bits/dim through
    bits_per_dim(nll, D, data_scale=image_data_scale(centered)).
    """
    unit = jax.vmap(uniform_dequantize)(keys, jnp.asarray(images, jnp.float32) / 255.0)
    return 2.0 * unit - 1.0 if centered else unit
