"""Denoising score matching plus the quasi-conservative penalty (docs/method.md, "Models").

For x0 ~ data, t ~ U(eps, 1), z ~ N(0, I), x_t = mean(x0, t) + std(t) z:

  L_DSM = E[ c lambda(t) ||s(x_t, t) + z / std(t)||^2 ]
          lambda = std^2 ('sigma2', Song et al. 2021) or g(t)^2 ('likelihood');
          c = dsm_scale: 1/2 (Song et al., the authors' image code) or 1 (their 2D code)
  L     = L_DSM + qc_weight * E[ std(t)^2 * Asym_estimate(x_t, t) ]

The penalty is evaluated at the same x_t and t as the DSM term, and the score value of its
primal pass is the one the DSM term uses (one network evaluation serves both). All the
randomness of one evaluation (t, z, the probes, the dropout key) is a `Noise`, drawn from
one key by `Loss.draw` or supplied by the caller (`Loss.evaluate`), row b of each array
belonging to sample b: train's gradient accumulation slices one batch's draws into
micro-batches, and tests feed the draws of a reference implementation.

A train step with the penalty on every sample costs 9 forward-pass units against a DSM
step's 3 (the penalty needs J v and J^T v, and their gradient; docs/benchmarks.md). Three
unbiased ways to pay less:
  qc_gradient 'jvp': differentiate only through J v, with a gradient estimate whose mean
    is the full penalty's (asymmetry.GRADIENTS); 7 units instead of 9.
  qc_fraction f: the penalty on ceil(f B) samples only (every B/m-th sample when that
    count m divides B, so that each device of a data-parallel mesh penalises its own share;
    else the first m). The batch is random, so their mean estimates the same expectation;
    the other samples get a plain forward pass.
  qc_every k: the penalty only on steps with step % k == 0, multiplied by k there. Its
    average over any k consecutive steps, and so its expected gradient over training, is
    the full penalty's, and qc_weight keeps its meaning for every k. The k-times larger
    gradient on penalty steps is what clipping and Adam see: fine while the penalty's
    gradient is small next to the DSM gradient (lambda = 1e-4 on images). The step is a
    Python int, so each program is branch-free and a train loop compiles one per branch
    (train.make_step_selector); a lax.cond on a traced step ran far slower than either
    branch on CPU, and its gradient would keep both branches' residuals.
remat: 'dots' or 'full' wraps the score function in jax.checkpoint, saving only matmul and
convolution outputs ('dots') or nothing ('full') for the backward pass: less memory, more
compute.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qcsbm_jax import asymmetry
from qcsbm_jax.score import ScoreFn
from qcsbm_jax.sde import bcast

WEIGHTINGS = ("sigma2", "likelihood")
REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def dsm_per_sample(score: jax.Array, z: jax.Array, std: jax.Array, weight: jax.Array,
                   scale: float = 0.5) -> jax.Array:
    """scale weight ||score + z/std||^2 per sample; score, z: [B, *S]; std, weight: [B]."""
    residual = score + z / bcast(std, z)
    return scale * weight * jnp.sum(jnp.square(residual), axis=tuple(range(1, z.ndim)))


class Noise(NamedTuple):
    """The random draws of one loss evaluation on a batch of B samples.

    t: [B] times in [eps, 1); z: [B, *S] standard normal; probes: [B, K, *S] Hutchinson
    probes (K = num_probes), None when the loss has no Hutchinson penalty; dropout_key:
    the key of the network's dropout masks (one for the batch).
    """
    t: jax.Array
    z: jax.Array
    probes: jax.Array | None
    dropout_key: jax.Array


@dataclasses.dataclass(frozen=True)
class Loss:
    """`loss(params, x0, key, step=None) -> (loss, metrics)` for a batch x0 [B, *S], in two
    parts: draw(key, x0) -> Noise, and evaluate(params, x0, noise, step=None), a pure
    function of its arguments (make_loss_fn documents step and the metrics)."""
    draw: Callable[[jax.Array, jax.Array], Noise]
    evaluate: Callable[..., tuple[jax.Array, dict]]

    def __call__(self, params, x0: jax.Array, key: jax.Array, step=None):
        return self.evaluate(params, x0, self.draw(key, x0), step)


def num_penalised(batch_size: int, qc_fraction: float) -> int:
    """ceil(qc_fraction * batch_size), at least 1 (rounding noise in the product ignored)."""
    return max(1, min(batch_size, math.ceil(round(qc_fraction * batch_size, 6))))


def split_penalised(a: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(the m penalised rows, the other B - m rows) of a [B, ...].

    When m divides B the penalised rows are every (B/m)-th row, spread over the batch so
    that on a data-parallel mesh each device penalises its own share without moving data
    (when m is also a multiple of the device count); otherwise the first m rows.
    """
    batch = a.shape[0]
    if batch % m:
        return a[:m], a[m:]
    groups = a.reshape(m, batch // m, *a.shape[1:])
    return groups[:, 0], groups[:, 1:].reshape(batch - m, *a.shape[1:])


def merge_penalised(penalised: jax.Array, rest: jax.Array) -> jax.Array:
    """The inverse of split_penalised: rows back in batch order."""
    m, batch = penalised.shape[0], penalised.shape[0] + rest.shape[0]
    if batch % m:
        return jnp.concatenate([penalised, rest])
    groups = rest.reshape(m, batch // m - 1, *rest.shape[1:])
    return jnp.concatenate([penalised[:, None], groups], axis=1).reshape(
        batch, *rest.shape[1:])


def _check_options(weighting, estimator, qc_fraction, qc_every, jacobian_method, remat,
                   qc_gradient, dsm_scale):
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if not dsm_scale > 0:
        raise ValueError(f"loss.dsm_scale must be > 0 (0.5 or 1.0), got {dsm_scale!r}.")
    if estimator not in asymmetry.ESTIMATORS:
        raise ValueError(
            f"loss.estimator must be one of {asymmetry.ESTIMATORS}, got {estimator!r}.")
    asymmetry.check_gradient(estimator, qc_gradient)
    if not 0 < qc_fraction <= 1:
        raise ValueError(f"loss.qc_fraction must be in (0, 1], got {qc_fraction!r}.")
    if not isinstance(qc_every, int) or qc_every < 1:
        raise ValueError(f"loss.qc_every must be an integer >= 1, got {qc_every!r}.")
    if jacobian_method not in asymmetry.PRODUCTS:
        raise ValueError(f"loss.jacobian_method must be one of {asymmetry.PRODUCTS}, "
                         f"got {jacobian_method!r}.")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"loss.remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}.")


def make_loss_fn(score_fn: ScoreFn, sde, *, weighting: str = "sigma2",
                 dsm_scale: float = 0.5, qc_weight: float = 0.0, estimator: str = "nonneg",
                 probe: str = "rademacher", num_probes: int = 1, qc_fraction: float = 1.0,
                 qc_every: int = 1, jacobian_method: str = "linearize", remat: str = "none",
                 qc_gradient: str = "estimate", eps: float = 1e-5) -> Loss:
    """Returns the Loss: `loss(params, x0, key, step=None) -> (loss, metrics)` for x0 [B, *S].

    dsm_scale: c in L_DSM (module docstring): 0.5, or 1.0 for the authors' 2D loss.
    step: the train step as a Python int, required when qc_every > 1 (it picks the branch
    while tracing; ignored otherwise).
    qc_gradient: 'estimate' differentiates the penalty estimate exactly (the paper);
    'jvp' gives an unbiased gradient of the same expected penalty without differentiating
    the J^T v pass (asymmetry module docstring): 7 forward-pass units instead of 9.
    metrics: 'loss', 'dsm' and, when qc_weight > 0, 'qc': the mean unweighted penalty of
    the penalised samples (with qc_every = k: k times that on penalty steps, 0 on the
    others, so that its average over k consecutive steps estimates the mean penalty).
    """
    _check_options(weighting, estimator, qc_fraction, qc_every, jacobian_method, remat,
                   qc_gradient, dsm_scale)
    if remat != "none":
        score_fn = jax.checkpoint(score_fn, policy=REMAT_POLICIES[remat])
    uses_probes = qc_weight > 0 and estimator != "exact"

    def draw(key: jax.Array, x0: jax.Array) -> Noise:
        t_key, z_key, dropout_key, probe_key = jax.random.split(key, 4)
        t = jax.random.uniform(t_key, (x0.shape[0],), x0.dtype, minval=eps, maxval=1.0)
        z = jax.random.normal(z_key, x0.shape, x0.dtype)
        probes = (asymmetry.draw_probes(probe_key, x0, num_probes, probe) if uses_probes
                  else None)
        return Noise(t, z, probes, dropout_key)

    def penalised(field, x_t, t, std, probes, scale):
        """(score [B, *S], scale * mean std^2 penalty, scale * mean penalty) over
        ceil(qc_fraction B) samples (split_penalised); a plain forward pass for the others."""
        m = num_penalised(x_t.shape[0], qc_fraction)
        (x_pen, x_rest), (t_pen, t_rest) = split_penalised(x_t, m), split_penalised(t, m)
        std_pen = split_penalised(std, m)[0]
        probes_pen = None if probes is None else split_penalised(probes, m)[0]
        score, penalty = asymmetry.penalty_with_probes(
            field, x_pen, t_pen, probes_pen, estimator=estimator, method=jacobian_method,
            gradient=qc_gradient)
        if x_rest.shape[0]:
            score = merge_penalised(score, field(x_rest, t_rest, rest=True))
        return (score, scale * jnp.mean(jnp.square(std_pen) * penalty),
                scale * jnp.mean(penalty))

    def batch_loss(params, x0, noise: Noise, penalty_scale: float):
        """(loss, metrics) with the penalty times penalty_scale; 0: no penalty pass."""
        mean, std = sde.marginal_mean_std(x0, noise.t)
        x_t = mean + bcast(std, x0) * noise.z

        def field(x, times, rest=False):
            """The score; samples outside the penalised part draw their own dropout."""
            key = noise.dropout_key
            return score_fn(params, x, times, jax.random.fold_in(key, 1) if rest else key)

        if penalty_scale:
            score, weighted_qc, qc = penalised(field, x_t, noise.t, std, noise.probes,
                                               penalty_scale)
        else:
            score = field(x_t, noise.t)
            weighted_qc = qc = jnp.zeros((), x_t.dtype)
        weight = (jnp.square(std) if weighting == "sigma2"
                  else jnp.square(sde.sde(x_t, noise.t)[1]))
        dsm = jnp.mean(dsm_per_sample(score, noise.z, std, weight, dsm_scale))
        metrics = {"dsm": dsm}
        loss = dsm
        if qc_weight > 0:
            metrics["qc"] = qc
            loss = dsm + qc_weight * weighted_qc
        metrics["loss"] = loss
        return loss, metrics

    def penalty_scale(step) -> float:
        if qc_weight == 0:
            return 0.0
        if qc_every == 1:
            return 1.0
        if step is None:
            raise ValueError("loss.qc_every > 1 needs the train step: call "
                             "loss_fn(params, x0, key, step).")
        if not isinstance(step, (int, np.integer)):
            raise TypeError(f"loss.qc_every > 1 needs the step as a Python int, got {step!r}; "
                            "compile one program per branch (train.make_step_selector).")
        return float(qc_every) if step % qc_every == 0 else 0.0

    def evaluate(params, x0: jax.Array, noise: Noise, step=None):
        return batch_loss(params, x0, noise, penalty_scale(step))

    return Loss(draw, evaluate)
