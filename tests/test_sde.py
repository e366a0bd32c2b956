"""SDEs against independent references: moment ODEs, simulation, scipy, exact Gaussian flows."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate, stats

from qcsbm_jax.sde import SubVPSDE, VESDE, VPSDE, get_sde

SDES = [VESDE(sigma_min=0.1, sigma_max=3.0), VESDE(), VPSDE(), SubVPSDE()]
IDS = ["ve_toy", "ve", "vp", "subvp"]
TIMES = np.array([1e-3, 0.1, 0.37, 0.8, 1.0], np.float32)


def _moments_by_ode(sde, times, var0=0.0):
    """Mean scale a(t) and variance v(t) at `times` of the SDE started at x0 = 1 with
    variance var0, by integrating a' = f a, v' = 2 f v + g^2 with scipy, where
    sde.sde(x, t) = (f(t) x, g(t)) (independent of the closed forms)."""
    coeffs = jax.jit(lambda t: sde.sde(jnp.ones((1, 1)), jnp.reshape(t, (1,))))

    def rhs(t, y):
        drift, g = coeffs(np.float32(t))
        f, g = float(drift[0, 0]), float(g[0])
        return [f * y[0], 2 * f * y[1] + g**2]

    sol = integrate.solve_ivp(rhs, (0.0, float(times[-1])), [1.0, var0], t_eval=times,
                              rtol=1e-9, atol=1e-12)
    return sol.y


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginals_solve_the_moment_odes(sde):
    x0 = jnp.full((len(TIMES), 1), 1.0)
    mean, std = sde.marginal_mean_std(x0, jnp.asarray(TIMES))
    var0 = sde.sigma_min**2 if isinstance(sde, VESDE) else 0.0  # VE: data pre-smoothed.
    a, v = _moments_by_ode(sde, TIMES.astype(np.float64), var0)
    np.testing.assert_allclose(mean[:, 0], a, rtol=1e-5)
    np.testing.assert_allclose(std**2, v, rtol=1e-4, atol=1e-10)


def test_closed_forms():
    t = jnp.asarray(TIMES)
    ve = VESDE(sigma_min=0.1, sigma_max=3.0)
    np.testing.assert_allclose(ve.marginal_mean_std(jnp.ones((5, 2)), t)[1],
                               0.1 * 30.0**TIMES, rtol=1e-6)
    vp, t64 = VPSDE(), TIMES.astype(np.float64)
    log_a = -0.25 * t64**2 * 19.9 - 0.05 * t64
    mean, std = vp.marginal_mean_std(jnp.ones((5, 2)), t)
    np.testing.assert_allclose(mean[:, 1], np.exp(log_a), rtol=1e-6)
    np.testing.assert_allclose(std, np.sqrt(1 - np.exp(2 * log_a)), rtol=1e-5)
    np.testing.assert_allclose(SubVPSDE().marginal_mean_std(jnp.ones((5, 2)), t)[1],
                               1 - np.exp(2 * log_a), rtol=1e-5)
    assert std.shape == (5,)


@pytest.mark.parametrize("sde", [VESDE(sigma_min=0.1, sigma_max=3.0), VPSDE(), SubVPSDE()],
                         ids=["ve", "vp", "subvp"])
def test_marginals_match_euler_maruyama_simulation(sde):
    n, num_steps, x0 = 20_000, 1000, jnp.array([1.5, -0.5])
    key0, key = jax.random.split(jax.random.key(0))
    start_std = sde.sigma_min if isinstance(sde, VESDE) else 0.0
    x = x0 + start_std * jax.random.normal(key0, (n, 2))
    dt = 1.0 / num_steps

    def step(x, i):
        drift, g = sde.sde(x, jnp.full((n,), i * dt))
        x = x + drift * dt + g[:, None] * np.sqrt(dt) * jax.random.normal(
            jax.random.fold_in(key, i), x.shape)
        return x, x

    _, path = jax.jit(lambda x: jax.lax.scan(step, x, jnp.arange(num_steps)))(x)
    for t_index in (299, 999):
        t = jnp.full((1,), (t_index + 1) * dt)
        mean, std = sde.marginal_mean_std(x0[None], t)
        sample = path[t_index]
        # 4 standard errors of the mean and of the variance (2 coordinates x n paths),
        # plus an O(dt) allowance for the Euler-Maruyama bias.
        np.testing.assert_allclose(sample.mean(0), mean[0], atol=4 * float(std[0]) / np.sqrt(n))
        np.testing.assert_allclose(sample.var(0).mean(), float(std[0]) ** 2,
                                   rtol=4 * np.sqrt(2 / (2 * n)) + 0.01)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior(sde):
    z = sde.prior_sample(jax.random.key(1), (50_000, 2, 3))
    assert z.shape == (50_000, 2, 3) and z.dtype == jnp.float32
    np.testing.assert_allclose(z.std(), sde.prior_std, rtol=0.01)
    expected = stats.norm.logpdf(np.asarray(z[:10], np.float64), scale=sde.prior_std).sum((1, 2))
    np.testing.assert_allclose(sde.prior_logp(z[:10]), expected, rtol=1e-5)
    # The prior is (close to) the marginal at T for data near 0.
    np.testing.assert_allclose(sde.marginal_mean_std(jnp.zeros((1, 1)), jnp.ones(1))[1][0],
                               sde.prior_std, rtol=1e-4 if isinstance(sde, VESDE) else 1e-3)


def test_noise_condition():
    t = jnp.asarray(TIMES)
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.noise_condition(t), 0.01 * 5000.0**TIMES, rtol=1e-5)
    np.testing.assert_allclose(VPSDE().noise_condition(t), TIMES)
    np.testing.assert_allclose(SubVPSDE().noise_condition(t), TIMES)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_probability_flow_drift_transports_gaussian_marginals(sde):
    """Data N(mu, s0^2 I) has marginals N(m_t, v_t I), m_t = alpha mu, v_t = alpha^2 s0^2 +
    std^2, and exact score -(x - m_t) / v_t. The flow that maps N(m_t, v_t) to itself at
    every t is x_t = m_t + (x_0 - m_0) sqrt(v_t / v_0), with velocity
    m_t' + (x - m_t) v_t' / (2 v_t): the probability-flow drift must equal it."""
    mu, s0 = jnp.array([0.7, -1.2, 0.3]), 0.4

    def moments(t):
        mean, std = sde.marginal_mean_std(jnp.broadcast_to(mu, (t.shape[0], 3)), t)
        var = jnp.square(sde.alpha(t) * s0) + jnp.square(std)
        return mean, var

    t = jnp.asarray(TIMES[1:])
    x = jax.random.normal(jax.random.key(2), (len(t), 3))
    (mean, var), (dmean, dvar) = jax.jvp(moments, (t,), (jnp.ones_like(t),))
    expected = dmean + (x - mean) * (dvar / (2 * var))[:, None]
    score = -(x - mean) / var[:, None]
    np.testing.assert_allclose(sde.reverse_drift(score, x, t, probability_flow=True),
                               expected, rtol=2e-3, atol=1e-4 * float(jnp.abs(expected).max()))
    # The reverse-SDE drift uses the full g^2 s.
    drift, g = sde.sde(x, t)
    np.testing.assert_allclose(sde.reverse_drift(score, x, t),
                               drift - (g**2)[:, None] * score, rtol=1e-6)


@pytest.mark.parametrize("sde", [VESDE(sigma_min=0.1, sigma_max=3.0), VPSDE()], ids=["ve", "vp"])
def test_discretize_is_the_exact_transition(sde):
    """x_t = x_s + f + G z (s = t - dt) composed with the kernel at s gives the kernel at t."""
    t, dt = jnp.array([0.9, 0.5, 0.05]), jnp.array([0.1, 0.2, 0.04])
    x0 = jnp.full((3, 1), 2.0)
    mean_s, std_s = sde.marginal_mean_std(x0, t - dt)
    mean_t, std_t = sde.marginal_mean_std(x0, t)
    f, g = sde.discretize(mean_s, t, dt)
    np.testing.assert_allclose(mean_s + f, mean_t, rtol=1e-5)
    scale = (mean_s + f) / mean_s  # the transition is linear in x
    np.testing.assert_allclose(jnp.square(scale[:, 0] * std_s) + g**2, std_t**2, rtol=1e-5)


def test_subvp_discretize_is_euler_maruyama():
    sde, x = SubVPSDE(), jnp.ones((2, 3))
    t, dt = jnp.array([0.5, 0.9]), jnp.array([1e-3, 2e-3])
    drift, g = sde.sde(x, t)
    f, big_g = sde.discretize(x, t, dt)
    np.testing.assert_allclose(f, drift * dt[:, None], rtol=1e-6)
    np.testing.assert_allclose(big_g, g * jnp.sqrt(dt), rtol=1e-6)


def test_get_sde_and_static_jit():
    config = ml_collections.ConfigDict(dict(name="ve", sigma_min=0.1, sigma_max=3.0,
                                            beta_min=0.1, beta_max=20.0))
    assert get_sde(**config) == VESDE(sigma_min=0.1, sigma_max=3.0)
    config.name = "subvp"
    assert get_sde(**config) == SubVPSDE(beta_min=0.1, beta_max=20.0)
    assert get_sde(**config) != VPSDE(beta_min=0.1, beta_max=20.0)
    config.name = "vesde"
    with pytest.raises(ValueError, match="'subvp', 've', 'vp'"):
        get_sde(**config)
    assert get_sde("ve", sigma_min=0.1, sigma_max=3.0) == VESDE(sigma_min=0.1, sigma_max=3.0)
    with pytest.raises(ValueError, match=r"needs \['beta_max'\]"):
        get_sde("vp", beta_min=0.1)

    std_at = jax.jit(lambda sde, t: sde.marginal_mean_std(jnp.zeros((1, 1)), t)[1],
                     static_argnums=0)
    t = jnp.array([0.3])
    np.testing.assert_allclose(std_at(SubVPSDE(), t), std_at(VPSDE(), t) ** 2, rtol=1e-5)
