"""Likelihoods on Gaussian data with an exact analytic score; bits/dim and dequantization.

Data N(mu, C) has marginals N(m_t, S_t), m_t = alpha mu, S_t = alpha^2 C + std^2 I, and
score -S_t^-1 (x - m_t). The S_t commute, so the probability-flow ODE is the linear map
z = m_T + M (x - m_eps), M = S_T^(1/2) S_eps^(-1/2), and the model density at eps is the
prior pulled back through it: log p(x) = log prior(z) + log det M (exactly N(m_eps, S_eps)
when the prior equals p_T).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from qcsbm_jax import asymmetry, likelihood
from qcsbm_jax.sde import SubVPSDE, VESDE, VPSDE

EPS = 1e-5
MU = np.array([0.5, -1.0])
COV = np.array([[0.3, 0.2], [0.2, 0.25]])


def gaussian_score(sde, mu, cov):
    def score_fn(params, x, t, key=None):
        del params, key
        alpha, std = sde.alpha(t), sde.std(t)
        cov_t = (alpha**2)[:, None, None] * cov + (std**2)[:, None, None] * jnp.eye(2)
        return -jnp.linalg.solve(cov_t, (x - alpha[:, None] * mu)[..., None])[..., 0]
    return score_fn


def exact_model(sde, mu, cov, x):
    """(log p(x) [B], z [B, 2]) in float64 for x [B, 2]."""
    def moments(t):
        t = jnp.full((1,), t)
        alpha, std = float(sde.alpha(t)[0]), float(sde.std(t)[0])
        return alpha * mu, alpha**2 * cov + std**2 * np.eye(2)

    def sqrt_and_logdet(a):
        w, v = np.linalg.eigh(a)
        return v @ np.diag(np.sqrt(w)) @ v.T, np.sum(np.log(w))

    (m_eps, s_eps), (m_t, s_t) = moments(EPS), moments(sde.T)
    (root_eps, logdet_eps), (root_t, logdet_t) = sqrt_and_logdet(s_eps), sqrt_and_logdet(s_t)
    z = m_t + (x - m_eps) @ (root_t @ np.linalg.inv(root_eps)).T
    prior = stats.norm.logpdf(z, scale=sde.prior_std).sum(axis=1)
    return prior + 0.5 * (logdet_t - logdet_eps), z


# VE with clean data at 0 (the kernel convention: smoothed data N(0, sigma_min^2 I)) has prior
# N(0, sigma_max^2 I) = p_T exactly; VP and sub-VP with correlated Gaussian data.
CASES = [(VESDE(sigma_min=0.1, sigma_max=3.0), np.zeros(2), np.zeros((2, 2))),
         (VPSDE(), MU, COV), (SubVPSDE(), MU, COV)]


@pytest.mark.parametrize("sde,mu,cov", CASES, ids=["ve", "vp", "subvp"])
def test_exact_divergence_gives_exact_log_density(sde, mu, cov):
    t = jnp.full((1,), EPS)
    std_eps = math.sqrt(float(sde.alpha(t)[0] ** 2 * np.abs(cov).max() + sde.std(t)[0] ** 2))
    x = jnp.asarray(mu + std_eps * np.random.default_rng(0).standard_normal((16, 2)),
                    jnp.float32)
    nll, z, nfe = jax.jit(lambda x: likelihood.ode_log_likelihood(
        None, x, score_fn=gaussian_score(sde, mu, cov), sde=sde, eps=EPS))(x)
    logp, z_exact = exact_model(sde, mu, cov, np.asarray(x, np.float64))
    np.testing.assert_allclose(nll, -logp, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(z, z_exact, rtol=1e-3, atol=1e-3 * sde.prior_std)
    assert z.shape == x.shape and nfe.shape == (16,) and nfe.dtype == jnp.int32
    assert np.all(nfe > 10) and np.all(nfe < 2000)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """Per-probe NLLs scatter (the drift Jacobian is not diagonal); their mean over many
    probes matches the exact value within 4 standard errors."""
    sde, points, copies = VPSDE(), 4, 64
    x0 = np.random.default_rng(1).multivariate_normal(MU, COV, size=points)
    x = jnp.asarray(np.repeat(x0, copies, axis=0), jnp.float32)
    probes = asymmetry.sample_probes(jax.random.key(2), x.shape, probe)
    nll, _, _ = jax.jit(lambda x, v: likelihood.ode_log_likelihood(
        None, x, score_fn=gaussian_score(sde, MU, COV), sde=sde, eps=EPS,
        divergence="hutchinson", probes=v, rtol=1e-4, atol=1e-4))(x, probes)
    nll = np.asarray(nll).reshape(points, copies)
    exact = -exact_model(sde, MU, COV, x0)[0]
    spread = nll.std(axis=1)
    assert np.all(spread > 0.05)
    assert np.all(np.abs(nll.mean(axis=1) - exact) < 4 * spread / np.sqrt(copies) + 2e-3)


def test_each_sample_uses_its_own_probe():
    """Row b's Hutchinson NLL depends on (x[b], probes[b]) only: permuting the rows
    permutes the values, and the same point with different probes gives different values."""
    sde = VPSDE()
    x = jnp.asarray(np.random.default_rng(4).multivariate_normal(MU, COV, size=4), jnp.float32)
    probes = asymmetry.sample_probes(jax.random.key(5), x.shape)
    solve = jax.jit(lambda x, v: likelihood.ode_log_likelihood(
        None, x, score_fn=gaussian_score(sde, MU, COV), sde=sde, eps=EPS,
        divergence="hutchinson", probes=v)[0])
    together = solve(x, probes)
    order = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(solve(x[order], probes[order]), together[order], rtol=1e-6)
    same_point = solve(jnp.repeat(x[:1], 4, axis=0), probes)
    np.testing.assert_allclose(same_point[0], together[0], rtol=1e-6)
    assert np.ptp(np.asarray(same_point)) > 1e-3  # the probes matter


def test_solver_failure_gives_nan_and_bad_arguments_raise():
    sde = VPSDE()
    x = jnp.asarray(np.stack([MU, MU + 0.1]), jnp.float32)
    nll, z, _ = jax.jit(lambda x: likelihood.ode_log_likelihood(
        None, x, score_fn=gaussian_score(sde, MU, COV), sde=sde, max_steps=2))(x)
    assert np.all(np.isnan(nll)) and np.all(np.isnan(z))
    with pytest.raises(ValueError, match="divergence"):
        likelihood.ode_log_likelihood(None, x, score_fn=None, sde=sde, divergence="skilling")
    with pytest.raises(ValueError, match="probes"):
        likelihood.ode_log_likelihood(None, x, score_fn=None, sde=sde, divergence="hutchinson")
    with pytest.raises(ValueError, match="probes"):
        likelihood.ode_log_likelihood(None, x, score_fn=None, sde=sde, probes=x)
    with pytest.raises(ValueError, match="shape"):
        likelihood.ode_log_likelihood(None, x, score_fn=None, sde=sde,
                                      divergence="hutchinson", probes=x[:1])


def test_bits_per_dim_of_uniform_densities():
    dims = 3 * 4 * 4
    # Uniform on [0, 1]^D: nll = 0, every cell has probability 256^-D: 8 bits exactly.
    np.testing.assert_allclose(likelihood.bits_per_dim(0.0, dims), 8.0, rtol=1e-6)
    # Uniform on [-1, 1]^D (y = 2x - 1): nll = D log 2, the same discrete model.
    np.testing.assert_allclose(
        likelihood.bits_per_dim(dims * math.log(2.0), dims, data_scale=2.0), 8.0, rtol=1e-6)
    # Uniform on [0, 255]^D (y = 255 x), 16 bins: nll = D log 255, 4 bits.
    np.testing.assert_allclose(likelihood.bits_per_dim(
        np.full(5, dims * math.log(255.0)), dims, data_scale=255.0, num_bins=16), 4.0,
        rtol=1e-6)


def test_bits_per_dim_bounds_the_discrete_likelihood():
    """p(y) = 2y on [0, 1] (D = 1), 4 bins: P(k) = ((k+1)^2 - k^2) / 16. The dequantized
    bound E_u[-log p((k + u) / 4)] in bits + log2(4) is >= -log2 P(k), equal only for
    densities constant within cells; for a density scaled to y = 3x the bound is the same."""
    for k in range(4):
        expected_nll = integrate.quad(lambda u: -math.log(2 * (k + u) / 4), 0, 1)[0]
        bound = float(likelihood.bits_per_dim(expected_nll, 1, num_bins=4))
        exact = -math.log2(((k + 1) ** 2 - k**2) / 16)
        assert exact <= bound < exact + 0.5
        # The same model on y = 3x: p_y(y) = p(y / 3) / 3, nll_y = nll + log 3.
        np.testing.assert_allclose(likelihood.bits_per_dim(
            expected_nll + math.log(3.0), 1, data_scale=3.0, num_bins=4), bound, rtol=1e-6)


def test_uniform_dequantize():
    k = jnp.tile(jnp.arange(256.0), 200)
    y = likelihood.uniform_dequantize(jax.random.key(3), k / 255.0)
    assert y.shape == k.shape and y.dtype == jnp.float32
    u = np.asarray(y) * 256 - np.asarray(k)  # exact: a power-of-2 scale
    assert np.all((u >= 0) & (u <= 1))  # u < 1 up to float32 rounding of k + u
    np.testing.assert_allclose(u.mean(), 0.5, atol=4 * math.sqrt(1 / 12 / u.size))
    np.testing.assert_allclose(u.var(), 1 / 12, rtol=0.03)


@pytest.mark.parametrize("centered", [False, True])
def test_dequantize_images_per_example(centered):
    """Example b's noise comes from keys[b] alone; cells (k + [0, 1)) / 256, mapped to
    2 x - 1 when centered; bits_per_dim's data_scale matches that map."""
    k = np.random.default_rng(6).integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
    keys = jax.random.split(jax.random.key(7), 3)
    y = np.asarray(likelihood.dequantize_images(keys, k, centered))
    unit = (y + 1) / 2 if centered else y
    u = unit * 256 - k
    assert y.dtype == np.float32 and np.all((u >= -1e-4) & (u <= 1 + 1e-4))
    expected = (k[1] + np.asarray(jax.random.uniform(keys[1], (4, 4, 1)))) / 256
    np.testing.assert_allclose(unit[1], expected, rtol=1e-6)
    np.testing.assert_allclose(likelihood.dequantize_images(keys[1:2], k[1:2], centered)[0],
                               y[1], rtol=1e-6)
    assert likelihood.image_data_scale(centered) == (2.0 if centered else 1.0)
