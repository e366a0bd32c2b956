"""The in-graph RK45 solver against scipy's RK45 and closed-form solutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, linalg

from qcsbm_jax import ode


def _lotka_volterra(t, y):
    del t
    return jnp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def _lotka_volterra_np(t, y):
    del t
    return np.array([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


@pytest.mark.parametrize("t0,t1", [(0.0, 6.0), (6.0, 0.0)], ids=["forward", "backward"])
def test_matches_scipy_rk45_step_for_step(t0, t1):
    """Same method and controller as scipy: in float64 the solutions agree to rounding and
    the evaluation counts are equal."""
    y0 = np.array([1.0, 1.0])
    with jax.enable_x64(True):
        solve = jax.jit(lambda y, rtol, atol: ode.solve(_lotka_volterra, y, t0, t1,
                                                        rtol=rtol, atol=atol))
        for rtol, atol in [(1e-3, 1e-6), (1e-7, 1e-10)]:
            y1, nfe = solve(jnp.asarray(y0), rtol, atol)
            ref = integrate.solve_ivp(_lotka_volterra_np, (t0, t1), y0, method="RK45",
                                      rtol=rtol, atol=atol)
            np.testing.assert_allclose(y1, ref.y[:, -1], rtol=1e-9)
            assert int(nfe) == ref.nfev
            assert y1.dtype == jnp.float64 and nfe.dtype == jnp.int32


def test_float32_accuracy_against_scipy():
    y0 = np.array([1.0, 1.0])
    y1, nfe = jax.jit(lambda y: ode.solve(_lotka_volterra, y, 0.0, 6.0, rtol=1e-5,
                                          atol=1e-5))(jnp.asarray(y0, jnp.float32))
    exact = integrate.solve_ivp(_lotka_volterra_np, (0.0, 6.0), y0, method="DOP853",
                                rtol=1e-12, atol=1e-12).y[:, -1]
    assert y1.dtype == jnp.float32
    np.testing.assert_allclose(y1, exact, rtol=2e-3)
    assert 50 < int(nfe) < 2000


@pytest.mark.parametrize("t1", [2.0, -1.5], ids=["forward", "backward"])
def test_exponential_decay(t1):
    k, y0 = 1.7, np.array([1.0, -3.0, 0.5])
    with jax.enable_x64(True):
        y1, nfe = jax.jit(lambda y: ode.solve(lambda t, y: -k * y, y, 0.0, t1, rtol=1e-8,
                                              atol=1e-10))(jnp.asarray(y0))
    np.testing.assert_allclose(y1, y0 * np.exp(-k * t1), rtol=1e-7)
    assert int(nfe) < 500


def test_linear_time_dependent_system_backwards():
    """y' = (1 + t) A y has y(t1) = expm(A (t1 + t1^2/2 - t0 - t0^2/2)) y(t0)."""
    a = np.array([[-0.5, 2.0], [-2.0, -0.1]])
    t0, t1, y0 = 1.0, 0.2, np.array([0.3, 1.0])
    with jax.enable_x64(True):
        y1, _ = ode.solve(lambda t, y: (1 + t) * (jnp.asarray(a) @ y), jnp.asarray(y0),
                          t0, t1, rtol=1e-9, atol=1e-12)
    expected = linalg.expm(a * (t1 + t1**2 / 2 - t0 - t0**2 / 2)) @ y0
    np.testing.assert_allclose(y1, expected, rtol=1e-7)


def test_pytree_state():
    """A dict state with leaves of different shapes: y' = -y and an accumulator c' = |y|^2."""
    y0 = {"y": jnp.array([[1.0, 2.0], [0.5, -1.0]]), "c": jnp.zeros(())}

    def fn(t, s):
        del t
        return {"y": -s["y"], "c": jnp.sum(jnp.square(s["y"]))}

    with jax.enable_x64(True):
        y0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), y0)
        out, _ = ode.solve(fn, y0, 0.0, 1.0, rtol=1e-9, atol=1e-12)
    sq = float(np.sum(np.square(y0["y"])))
    assert out["y"].shape == (2, 2) and out["c"].shape == ()
    np.testing.assert_allclose(out["y"], np.asarray(y0["y"]) * np.exp(-1.0), rtol=1e-8)
    np.testing.assert_allclose(out["c"], sq * (1 - np.exp(-2.0)) / 2, rtol=1e-8)


def test_vmap_gives_each_trajectory_its_own_steps():
    rates = jnp.array([0.1, 1.0, 5.0, 40.0])
    solve_one = lambda k: ode.solve(lambda t, y: -k * y, jnp.ones(2), 0.0, 1.0,
                                    rtol=1e-5, atol=1e-7)
    y1, nfe = jax.jit(jax.vmap(solve_one))(rates)
    np.testing.assert_allclose(y1[:, 0], np.exp(-np.asarray(rates)), rtol=1e-4, atol=1e-6)
    assert nfe.shape == (4,) and len(set(np.asarray(nfe).tolist())) == 4
    assert np.all(np.diff(np.asarray(nfe)) > 0)  # stiffer -> more evaluations
    for i, k in enumerate(rates):
        single_y, single_nfe = solve_one(k)
        assert int(single_nfe) == int(nfe[i])
        np.testing.assert_allclose(single_y, y1[i], rtol=1e-5, atol=1e-9)


def test_max_steps_failure_is_nan():
    fn = lambda t, y: jnp.cos(20 * t) * y
    y1, nfe = ode.solve(fn, jnp.ones(2), 0.0, 10.0, rtol=1e-6, atol=1e-8, max_steps=5)
    assert np.all(np.isnan(y1)) and int(nfe) == ode.max_nfe(5)
    y1, nfe = ode.solve(fn, jnp.ones(2), 0.0, 10.0, rtol=1e-6, atol=1e-8)
    assert np.all(np.isfinite(y1)) and int(nfe) < ode.max_nfe(ode.DEFAULT_MAX_STEPS)


def test_non_finite_vector_field_fails_fast():
    fn = lambda t, y: jnp.where(t > 0.5, jnp.nan, -y)
    y1, nfe = ode.solve(fn, jnp.ones(2), 0.0, 1.0, rtol=1e-5, atol=1e-5, max_steps=1000)
    assert np.all(np.isnan(y1)) and int(nfe) < ode.max_nfe(1000)
