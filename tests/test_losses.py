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


def _toy_score_fn(seed=0):
    """A small random toy network as score_fn(params, x, t, key) and its params."""
    from flax import nnx

    from qcsbm_jax import score
    from qcsbm_jax.models import functional
    from qcsbm_jax.models.toy import ToyScoreNet
    apply_fn, params = functional(ToyScoreNet(DIM, (8, 16), (1, 1), rngs=nnx.Rngs(seed)))
    return score.make_score_fn(apply_fn, SDE, "unconstrained", "residual"), params


def _noisy_inputs(x0, key):
    """The (x_t, t) a loss draws for this key: recorded from an eager DSM-only call."""
    seen = []

    def recording(params, x, t, k=None):
        seen.append((x, t))
        return jnp.zeros_like(x)

    losses.make_loss_fn(recording, SDE)(None, x0, key)
    return seen[0]


@pytest.mark.parametrize("batch, fraction, rows", [
    (10, 1.0, slice(None)), (10, 0.3, slice(0, 3)), (16, 0.25, slice(None, None, 4))])
def test_penalty_on_a_fraction_of_the_batch_matches_reference(batch, fraction, rows):
    score_fn, params = _toy_score_fn()
    x0 = jax.random.normal(jax.random.key(0), (batch, DIM))
    key = jax.random.key(1)
    lam = 0.7
    loss_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=lam, estimator="exact",
                                  qc_fraction=fraction)
    loss, metrics = jax.jit(loss_fn)(params, x0, key)
    # Reference: the DSM of the plain loss, plus the exact Asym (jacfwd) on the penalised
    # rows: every (B/m)-th when m divides B, else the first m.
    x_t, t = _noisy_inputs(x0, key)
    assert len(range(batch)[rows]) == losses.num_penalised(batch, fraction)
    single = lambda xi, ti: score_fn(params, xi[None], ti[None])[0]
    jac = jax.jit(jax.vmap(jax.jacfwd(single)))(x_t[rows], t[rows])
    asym = asymmetry.asymmetry(jac)
    dsm = jax.jit(losses.make_loss_fn(score_fn, SDE))(params, x0, key)[0]
    np.testing.assert_allclose(metrics["dsm"], dsm, rtol=1e-6)
    np.testing.assert_allclose(metrics["qc"], jnp.mean(asym), rtol=1e-5)
    np.testing.assert_allclose(loss, dsm + lam * jnp.mean(_std(t[rows]) ** 2 * asym),
                               rtol=1e-5)


@pytest.mark.parametrize("batch, m", [(12, 3), (12, 5), (12, 12)])
def test_split_and_merge_of_the_penalised_rows(batch, m):
    a = jnp.arange(batch * 2.0).reshape(batch, 2)
    penalised, rest = losses.split_penalised(a, m)
    assert penalised.shape == (m, 2) and rest.shape == (batch - m, 2)
    np.testing.assert_array_equal(penalised, a[::batch // m] if batch % m == 0 else a[:m])
    np.testing.assert_array_equal(losses.merge_penalised(penalised, rest), a)


def test_penalty_on_a_fraction_moves_no_data_between_devices():
    """Batch sharded over 8 devices, a quarter penalised: each device penalises its own
    rows, so the compiled gradient needs the one all-reduce of data parallelism only."""
    from qcsbm_jax import parallel
    score_fn, params = _toy_score_fn()
    mesh = parallel.make_mesh(devices=jax.devices()[:8])
    x0 = jax.device_put(jax.random.normal(jax.random.key(0), (512, DIM)),
                        parallel.data_sharding(mesh))
    loss_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=0.5, qc_fraction=0.25)
    grad = jax.jit(jax.grad(lambda p, x, k: loss_fn(p, x, k)[0]),
                   in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh), None))
    hlo = grad.lower(params, x0, jax.random.key(1)).compile().as_text()
    for collective in ("collective-permute", "all-gather", "all-to-all"):
        assert f" {collective}(" not in hlo, collective
    assert " all-reduce(" in hlo


def test_penalty_every_k_steps_averages_to_the_full_penalty():
    score_fn, params = _toy_score_fn(seed=2)
    x0 = jax.random.normal(jax.random.key(0), (16, DIM))
    key = jax.random.key(3)
    full_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=0.5)
    every_fn = jax.jit(jax.value_and_grad(
        losses.make_loss_fn(score_fn, SDE, qc_weight=0.5, qc_every=3), has_aux=True),
        static_argnums=3)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(full_fn, has_aux=True))(
        params, x0, key)
    steps = [every_fn(params, x0, key, s) for s in range(3)]
    np.testing.assert_allclose(np.mean([s[0][0] for s in steps]), loss, rtol=1e-6)
    np.testing.assert_allclose(np.mean([s[0][1]["qc"] for s in steps]), metrics["qc"],
                               rtol=1e-6)
    for s in steps[1:]:  # Off steps: the DSM loss alone.
        np.testing.assert_allclose(s[0][0], metrics["dsm"], rtol=1e-6)
        assert float(s[0][1]["qc"]) == 0.0
    mean_grads = jax.tree.map(lambda *g: np.mean(g, axis=0), *[s[1] for s in steps])
    for g, e in zip(jax.tree.leaves(mean_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7)
    # The cycle repeats: step 3 penalises like step 0.
    np.testing.assert_allclose(every_fn(params, x0, key, 3)[0][0], steps[0][0][0],
                               rtol=1e-6)


def test_penalty_on_a_fraction_is_unbiased():
    """Closed form as in test_qc_term_is_sigma2_weighted_asymmetry, a quarter penalised."""
    a = jnp.array([[0.0, 0.7], [-0.7, 0.0]])

    def score_fn(params, x, t, key=None):
        return _exact_score(params, x, t) + x @ a.T

    loss_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=0.3, estimator="nonneg",
                                  qc_fraction=0.25)
    metrics = _mc_loss(jax.jit(loss_fn), batch=100_000, repeats=2)
    expected_extra = 0.3 * float(asymmetry.asymmetry(a[None])[0]) * _time_average(
        lambda t: _std(t) ** 2)
    np.testing.assert_allclose(metrics["loss"] - metrics["dsm"], expected_extra, rtol=2e-2)


def test_remat_and_jacobian_method_leave_loss_and_gradients_unchanged():
    score_fn, params = _toy_score_fn(seed=4)
    x0 = jax.random.normal(jax.random.key(0), (8, DIM))

    def value_and_grad(**options):
        loss_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=0.5, **options)
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            params, x0, jax.random.key(5))

    (loss, _), grads = value_and_grad()
    for options in (dict(remat="dots"), dict(remat="full", jacobian_method="separate")):
        (got, _), got_grads = value_and_grad(**options)
        np.testing.assert_allclose(got, loss, rtol=1e-6)
        for g, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-8)


def _compiled_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_jvp_gradient_keeps_the_loss_and_leaves_the_transpose_pass_undifferentiated():
    """qc_gradient='jvp': the same loss value; XLA's flop count of loss + gradient falls
    from about 3x DSM's towards 7/3 (the J^T v pass is not differentiated)."""
    score_fn, params = _toy_score_fn(seed=4)
    x0 = jax.random.normal(jax.random.key(0), (64, DIM))
    key = jax.random.key(5)

    def value_and_grad(qc_weight, **options):
        loss_fn = losses.make_loss_fn(score_fn, SDE, qc_weight=qc_weight, **options)
        return jax.value_and_grad(loss_fn, has_aux=True)

    (loss, metrics), _ = value_and_grad(0.5)(params, x0, key)
    (jvp_loss, jvp_metrics), _ = value_and_grad(0.5, qc_gradient="jvp")(params, x0, key)
    np.testing.assert_allclose(jvp_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(jvp_metrics["qc"], metrics["qc"], rtol=1e-6)
    flops = {name: _compiled_flops(value_and_grad(weight, **options), params, x0, key)
             for name, weight, options in (("dsm", 0.0, {}), ("estimate", 0.5, {}),
                                           ("jvp", 0.5, dict(qc_gradient="jvp")))}
    assert flops["estimate"] / flops["dsm"] > 2.7, flops
    assert flops["jvp"] / flops["dsm"] < 2.4, flops


def test_jvp_gradient_needs_a_hutchinson_estimator_with_both_products():
    for estimator in ("exact", "two_vjp"):
        with pytest.raises(ValueError, match="loss.estimator"):
            losses.make_loss_fn(_exact_score, SDE, qc_weight=1.0, estimator=estimator,
                                qc_gradient="jvp")


@pytest.mark.parametrize("option, value", [
    ("qc_fraction", 0.0), ("qc_fraction", 1.5), ("qc_every", 0), ("qc_every", 2.0),
    ("remat", "bad"), ("jacobian_method", "bad"), ("qc_gradient", "bad")])
def test_bad_cost_options(option, value):
    with pytest.raises(ValueError, match=option):
        losses.make_loss_fn(_exact_score, SDE, qc_weight=1.0, **{option: value})


def test_qc_every_needs_the_step_as_a_python_int():
    loss_fn = losses.make_loss_fn(_exact_score, SDE, qc_weight=1.0, qc_every=2)
    with pytest.raises(ValueError, match="step"):
        loss_fn(None, jnp.zeros((4, DIM)), jax.random.key(0))
    with pytest.raises(TypeError, match="Python int"):
        jax.jit(loss_fn)(None, jnp.zeros((4, DIM)), jax.random.key(0), 0)
