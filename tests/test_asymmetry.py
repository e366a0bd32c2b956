"""Asymmetry estimators against exact Jacobians from jax.jacfwd."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qcsbm_jax import asymmetry, score
from qcsbm_jax.models import functional
from qcsbm_jax.models.toy import ToyScoreNet
from qcsbm_jax.sde import VESDE

HUTCHINSON = ("nonneg", "jvp_vjp", "two_vjp")
SDE = VESDE(sigma_min=0.1, sigma_max=3.0)


def _toy_field(family, seed=0):
    """A random toy score network as field(params, x, t) and its params."""
    apply_fn, params = functional(ToyScoreNet(2, (8, 16), (1, 1), rngs=nnx.Rngs(seed)))
    score_fn = score.make_score_fn(apply_fn, SDE, family, "residual")
    return score_fn, params


def _points(batch=5, dim=2, seed=1):
    kx, kt = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (batch, dim)), jax.random.uniform(kt, (batch,), minval=0.05)


def _jacfwd_jacobian(score_fn, params, x, t):
    """Reference: per-sample Jacobian of the single-sample function by jax.jacfwd."""
    single = lambda xi, ti: score_fn(params, xi[None], ti[None])[0]
    return jax.jit(jax.vmap(jax.jacfwd(single)))(x, t)


def _all_sign_probes(batch, dim):
    """Every Rademacher vector of R^dim, for each sample: [2^dim, B, dim].

    The uniform distribution over all 2^dim sign vectors has E[v v^T] = I exactly, so the
    mean of an unbiased estimator over them equals its expectation to rounding error.
    """
    signs = jnp.array(list(itertools.product([-1.0, 1.0], repeat=dim)))
    return jnp.broadcast_to(signs[:, None, :], (len(signs), batch, dim))


def test_full_jacobian_matches_jacfwd():
    score_fn, params = _toy_field("unconstrained")
    x, t = _points()
    value_and_jacobian = jax.jit(
        lambda y: asymmetry.value_and_jacobian(lambda z: score_fn(params, z, t), y))
    out, jac = value_and_jacobian(x)
    np.testing.assert_allclose(jac, _jacfwd_jacobian(score_fn, params, x, t), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(out, score_fn(params, x, t), rtol=1e-6)


def test_full_jacobian_on_image_shaped_input():
    """Flattening of [B, H, W, C] inputs: compare with jacfwd of a coupled linear map."""
    a = jax.random.normal(jax.random.key(0), (12, 12))
    f = lambda y: (y.reshape(y.shape[0], -1) @ a.T).reshape(y.shape)
    x = jax.random.normal(jax.random.key(1), (3, 2, 2, 3))
    jac = asymmetry.full_jacobian(f, x)
    np.testing.assert_allclose(jac, jnp.broadcast_to(a, (3, 12, 12)), rtol=1e-6)


def test_jacobian_products_match_jacfwd():
    score_fn, params = _toy_field("unconstrained")
    x, t = _points()
    jac = _jacfwd_jacobian(score_fn, params, x, t)
    v = asymmetry.sample_probes(jax.random.key(3), x.shape, "gaussian")
    field = lambda y: score_fn(params, y, t)
    for method in asymmetry.PRODUCTS:
        out, jv, jtv = jax.jit(lambda y, w, m=method: asymmetry.jacobian_products(
            field, y, w, m))(x, v)
        np.testing.assert_allclose(out, field(x), rtol=1e-6)
        np.testing.assert_allclose(jv, jnp.einsum("bij,bj->bi", jac, v), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jtv, jnp.einsum("bji,bj->bi", jac, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        asymmetry.jacobian_products(field, x, v, "bad")


@pytest.mark.parametrize("estimator", HUTCHINSON)
@pytest.mark.parametrize("family", ["unconstrained", "constrained"])
def test_estimators_exact_in_expectation(estimator, family):
    score_fn, params = _toy_field(family)
    x, t = _points()
    jac = _jacfwd_jacobian(score_fn, params, x, t)
    probes = _all_sign_probes(*x.shape)
    field = lambda y: score_fn(params, y, t)
    estimates = jax.jit(jax.vmap(
        lambda v: asymmetry.hutchinson_asymmetry(field, x, v, estimator)[1]))(probes)
    # Rounding error scales with ||J||_F^2 (the exact value is ~0 for the constrained family).
    atol = 1e-6 * float(jnp.max(jnp.sum(jac**2, axis=(1, 2))))
    np.testing.assert_allclose(estimates.mean(0), asymmetry.asymmetry(jac), rtol=1e-4,
                               atol=atol)


@pytest.mark.parametrize("estimator, gradient", [
    ("nonneg", "estimate"), ("jvp_vjp", "estimate"), ("two_vjp", "estimate"),
    ("nonneg", "jvp"), ("jvp_vjp", "jvp")])
def test_estimator_parameter_gradients_match_exact(estimator, gradient):
    """The mean gradient over all 2^D sign probes (E[v v^T] = I exactly) is the exact
    gradient of Asym, for the estimate's own gradient and for the 'jvp' surrogate."""
    score_fn, params = _toy_field("unconstrained", seed=3)
    x, t = _points(seed=4)
    probes = _all_sign_probes(*x.shape)

    def exact_loss(p):
        return asymmetry.asymmetry(_jacfwd_jacobian(score_fn, p, x, t)).sum()

    def estimated_loss(p):
        field = lambda y: score_fn(p, y, t)
        per_probe = jax.vmap(lambda v: asymmetry.hutchinson_asymmetry(
            field, x, v, estimator, gradient=gradient)[1].sum())(probes)
        return per_probe.mean()

    expected = jax.jit(jax.grad(exact_loss))(params)
    got = jax.jit(jax.grad(estimated_loss))(params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected))
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, atol=1e-4 * scale)
    assert scale > 1e-3  # The penalty really depends on the parameters.


@pytest.mark.parametrize("estimator", ["nonneg", "jvp_vjp"])
def test_jvp_gradient_keeps_the_value_and_changes_only_the_per_probe_gradient(estimator):
    score_fn, params = _toy_field("unconstrained", seed=3)
    x, t = _points(seed=4)
    v = asymmetry.sample_probes(jax.random.key(5), x.shape)

    def penalty(p, gradient):
        field = lambda y: score_fn(p, y, t)
        return asymmetry.hutchinson_asymmetry(field, x, v, estimator, gradient=gradient)[1]

    value = {g: penalty(params, g) for g in asymmetry.GRADIENTS}
    np.testing.assert_allclose(value["jvp"], value["estimate"], rtol=1e-6)
    grads = {g: jax.grad(lambda p: penalty(p, g).sum())(params) for g in asymmetry.GRADIENTS}
    gap = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(grads["jvp"]), jax.tree.leaves(grads["estimate"])))
    assert gap > 1e-3  # One probe: another estimate of the same expected gradient.


def test_jvp_gradient_needs_both_products():
    f, x = (lambda y: y), jnp.ones((1, 2))
    with pytest.raises(ValueError, match="nonneg"):
        asymmetry.hutchinson_asymmetry(f, x, x, "two_vjp", gradient="jvp")
    with pytest.raises(ValueError, match="gradient"):
        asymmetry.hutchinson_asymmetry(f, x, x, "nonneg", gradient="bad")
    with pytest.raises(ValueError, match="estimate"):
        asymmetry.asymmetry_penalty(lambda y, t: y, x, jnp.ones(1), jax.random.key(0),
                                    estimator="exact", gradient="jvp")


def test_gaussian_probes_unbiased_statistically():
    """Gaussian probes on a fixed linear field: mean within 5 standard errors."""
    a = jnp.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0], [0.3, -2.0, 1.0]])
    f = lambda y: y @ a.T
    x = jnp.zeros((20000, 3))
    v = asymmetry.sample_probes(jax.random.key(0), x.shape, "gaussian")
    exact = float(asymmetry.asymmetry(a[None])[0])
    for estimator in HUTCHINSON:
        est = np.asarray(asymmetry.hutchinson_asymmetry(f, x, v, estimator)[1])
        stderr = est.std() / np.sqrt(est.size)
        assert abs(est.mean() - exact) < 5 * stderr, estimator


def test_symmetric_fields_give_zero():
    sym = jnp.array([[2.0, -1.0], [-1.0, 3.0]])
    x, _ = _points()
    v = asymmetry.sample_probes(jax.random.key(2), x.shape)
    for estimator in HUTCHINSON:
        est = asymmetry.hutchinson_asymmetry(lambda y: y @ sym.T, x, v, estimator)[1]
        np.testing.assert_array_equal(est, 0.0)
    # A conservative network field (score = -grad E) is symmetric to rounding error.
    score_fn, params = _toy_field("constrained")
    x, t = _points()
    field = lambda y: score_fn(params, y, t)
    jac = asymmetry.full_jacobian(field, x)
    np.testing.assert_allclose(asymmetry.asymmetry(jac), 0.0, atol=1e-8)
    for estimator in HUTCHINSON:
        est = asymmetry.hutchinson_asymmetry(field, x, v, estimator)[1]
        np.testing.assert_allclose(est, 0.0, atol=1e-6 * float(jnp.sum(jac**2)))


def test_asym_and_nasym_known_values():
    rotation = jnp.array([[0.0, -1.0], [1.0, 0.0]])
    diagonal = jnp.diag(jnp.array([1.0, 2.0]))
    mixed = jnp.array([[1.0, 2.0], [0.0, 1.0]])
    jac = jnp.stack([rotation, diagonal, mixed])
    # ||J - J^T||_F^2 = 8, 0, 8; ||J||_F^2 = 2, 5, 6.
    np.testing.assert_allclose(asymmetry.asymmetry(jac), [4.0, 0.0, 4.0])
    np.testing.assert_allclose(asymmetry.normalized_asymmetry(jac), [1.0, 0.0, 2.0 / 6.0])


def test_penalty_with_probe_copies_and_reused_output():
    score_fn, params = _toy_field("unconstrained")
    x, t = _points(batch=4)
    field = lambda y, tt: score_fn(params, y, tt)
    exact = asymmetry.asymmetry(_jacfwd_jacobian(score_fn, params, x, t))
    penalty = jax.jit(asymmetry.asymmetry_penalty,
                      static_argnames=("field", "estimator", "probe", "num_probes"))
    out, pen = penalty(field, x, t, jax.random.key(0), estimator="exact")
    np.testing.assert_allclose(pen, exact, rtol=1e-5)
    np.testing.assert_allclose(out, field(x, t), rtol=1e-6)
    out, pen = penalty(field, x, t, jax.random.key(0), num_probes=4096)
    assert pen.shape == (4,)
    np.testing.assert_allclose(out, field(x, t), rtol=1e-6)
    np.testing.assert_allclose(pen, exact, rtol=0.1)


def test_hutchinson_metrics_unbiased():
    score_fn, params = _toy_field("unconstrained")
    x, t = _points()
    jac = _jacfwd_jacobian(score_fn, params, x, t)
    field = lambda y: score_fn(params, y, t)
    asym, frob = jax.jit(jax.vmap(lambda v: asymmetry.hutchinson_metrics(field, x, v)))(
        _all_sign_probes(*x.shape))
    np.testing.assert_allclose(asym.mean(0), asymmetry.asymmetry(jac), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(frob.mean(0), jnp.sum(jac**2, axis=(1, 2)), rtol=1e-5)


def test_nonneg_has_lower_variance_on_a_random_network():
    """Backs the choice of default: on a random toy network 'nonneg' varies less."""
    score_fn, params = _toy_field("unconstrained", seed=7)
    x, t = _points(batch=2000, seed=8)
    v = asymmetry.sample_probes(jax.random.key(9), x.shape)
    field = lambda y: score_fn(params, y, t)
    var = {e: float(jnp.var(asymmetry.hutchinson_asymmetry(field, x, v, e)[1]))
           for e in ("nonneg", "jvp_vjp")}
    assert var["nonneg"] < var["jvp_vjp"], var


def test_unknown_estimator_and_probe():
    with pytest.raises(ValueError, match="estimator"):
        asymmetry.hutchinson_asymmetry(lambda y: y, jnp.ones((1, 2)), jnp.ones((1, 2)), "bad")
    with pytest.raises(ValueError, match="probe"):
        asymmetry.sample_probes(jax.random.key(0), (2, 2), "bad")
