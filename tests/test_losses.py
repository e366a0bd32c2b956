"""DSM and QC losses against closed forms on Gaussian data with an exact score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcsbm_jax import asymmetry, losses
from qcsbm_jax.sde import VESDE

SDE = VESDE(sigma_min=0.1, sigma_max=3.0)
S0 = 0.5  # Data N(0, S0^2 I).
DIM = 2


def _std(t):
    return SDE.marginal_mean_std(jnp.zeros((t.shape[0], DIM)), t)[1]


def _exact_score(params, x, t, key=None):
    """Score of N(0, (S0^2 + std^2) I), the perturbed Gaussian data."""
    del params, key
    return -x / (S0**2 + _std(t)[:, None] ** 2)


def _time_average(fn, eps=1e-5, n=200_001):
    """E_{t ~ U(eps, 1)} fn(t) by the trapezoid rule."""
    t = jnp.linspace(eps, 1.0, n)
    return float(jnp.trapezoid(fn(t), t) / (1.0 - eps))


def _mc_loss(loss_fn, params=None, batch=200_000, repeats=4):
    x0 = S0 * jax.random.normal(jax.random.key(0), (batch, DIM))
    values = [loss_fn(params, x0, jax.random.key(k + 1)) for k in range(repeats)]
    return {k: float(np.mean([v[1][k] for v in values])) for k in values[0][1]}


def test_dsm_sigma2_minimum_matches_closed_form():
    # With the exact score, E[1/2 std^2 ||s + z/std||^2] = D/2 * S0^2 / (S0^2 + std^2).
    loss_fn = losses.make_loss_fn(_exact_score, SDE)
    expected = _time_average(lambda t: DIM / 2 * S0**2 / (S0**2 + _std(t) ** 2))
    np.testing.assert_allclose(_mc_loss(loss_fn)["loss"], expected, rtol=5e-3)


def test_dsm_likelihood_weighting_matches_closed_form():
    loss_fn = losses.make_loss_fn(_exact_score, SDE, weighting="likelihood")
    g2 = lambda t: jnp.square(SDE.sde(jnp.zeros((t.shape[0], DIM)), t)[1])
    expected = _time_average(
        lambda t: g2(t) * DIM / 2 * (1 / _std(t) ** 2 - 1 / (S0**2 + _std(t) ** 2)))
    np.testing.assert_allclose(_mc_loss(loss_fn)["loss"], expected, rtol=2e-2)


def test_exact_score_minimises_dsm():
    def scaled_score(scale):
        return lambda p, x, t, key=None: scale * _exact_score(p, x, t)

    values = [_mc_loss(losses.make_loss_fn(scaled_score(c), SDE), batch=50_000)["loss"]
              for c in (0.8, 1.0, 1.2)]
    assert values[1] < values[0] and values[1] < values[2]


@pytest.mark.parametrize("estimator", ["exact", "nonneg", "two_vjp"])
def test_qc_term_is_sigma2_weighted_asymmetry(estimator):
    """For s = _exact_score + A x with A antisymmetric: QC adds lambda Asym(A) E[std^2]."""
    a = jnp.array([[0.0, 0.7], [-0.7, 0.0]])

    def score_fn(params, x, t, key=None):
        return _exact_score(params, x, t) + x @ a.T

    lam = 0.3
    loss_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=lam, estimator=estimator)
    metrics = _mc_loss(loss_fn, batch=100_000, repeats=2)
    asym_a = float(asymmetry.asymmetry(a[None])[0])
    np.testing.assert_allclose(metrics["qc"], asym_a, rtol=1e-2)
    expected_extra = lam * asym_a * _time_average(lambda t: _std(t) ** 2)
    np.testing.assert_allclose(metrics["loss"] - metrics["dsm"], expected_extra, rtol=2e-2)


def test_gradient_of_qc_loss_flows_to_params():
    def score_fn(params, x, t, key=None):
        return x @ params.T

    loss_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=1.0, estimator="exact")
    x0 = jax.random.normal(jax.random.key(0), (64, DIM))
    symmetric = jnp.array([[1.0, 0.5], [0.5, 2.0]])
    rotated = symmetric + jnp.array([[0.0, 1.0], [-1.0, 0.0]])
    qc_part = lambda p: (loss_fn(p, x0, jax.random.key(1))[0]
                         - losses.make_loss_fn(score_fn, SDE)(p, x0, jax.random.key(1))[0])
    grad_sym = jax.grad(qc_part)(symmetric)
    grad_rot = jax.grad(qc_part)(rotated)
    np.testing.assert_allclose(grad_sym, 0.0, atol=1e-6)
    # d/dA of 1/2||A - A^T||^2 = 2 (A - A^T), times the mean std^2 of the batch.
    direction = grad_rot / jnp.linalg.norm(grad_rot)
    np.testing.assert_allclose(direction, jnp.array([[0, 1], [-1, 0]]) / np.sqrt(2), atol=1e-5)


def test_bad_weighting_and_estimator():
    with pytest.raises(ValueError, match="weighting"):
        losses.make_loss_fn(_exact_score, SDE, weighting="bad")
    with pytest.raises(ValueError, match="estimator"):
        losses.make_loss_fn(_exact_score, SDE, estimator="bad")
