"""Samplers on Gaussian data with an exact analytic score (no network).

Data N(mu, s0^2 I) has marginals N(alpha mu, v I), v = alpha^2 s0^2 + std^2 (VE: alpha = 1),
and score -(x - alpha mu) / v. Moment tolerances: 4 standard errors (mean: sqrt(v / n);
variance: sqrt(2 / (n D)) relative, pooled over the D coordinates) plus the stated
discretization allowance.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcsbm_jax import config as config_lib, experiment, parallel, sampling, streams
from qcsbm_jax.sampling import registry
from qcsbm_jax.sde import SubVPSDE, VESDE, VPSDE

EPS = 1e-3


def gaussian_score(sde, mu, s0):
    def score_fn(params, x, t, key=None):
        del params, key
        alpha, std = sde.alpha(t)[:, None], sde.std(t)[:, None]
        return -(x - alpha * mu) / (jnp.square(alpha * s0) + jnp.square(std))
    return score_fn


def marginal(sde, mu, s0, t):
    """Mean and variance (shapes of mu and s0) of N(mu, s0^2)'s marginal at scalar time t."""
    t = jnp.full((1,), t)
    alpha = sde.alpha(t)[0]
    return alpha * mu, jnp.square(alpha * s0) + jnp.square(sde.std(t)[0])


def check_moments(x, mean, var, bias):
    n, dims = x.shape
    np.testing.assert_allclose(x.mean(0), mean, atol=4 * np.sqrt(var / n))
    np.testing.assert_allclose(x.var(0).mean(), var, rtol=4 * np.sqrt(2 / (n * dims)) + bias)


def test_reverse_diffusion_ve_point_mass():
    """VE with clean data at 0 (smoothed data N(0, sigma_min^2 I)): p_t = N(0, sigma(t)^2 I),
    score -x / sigma(t)^2. A reverse step from N(0, v_t) gives v_{t-dt} + G^4 / v_t, so the
    relative variance excess settles near G^2 / v_t = 1 - (sigma_max/sigma_min)^(-2/N)."""
    sde, num_steps = VESDE(sigma_min=0.01, sigma_max=5.0), 500
    score_fn = gaussian_score(sde, jnp.zeros(2), 0.0)
    x = jax.jit(lambda key: sampling.pc_sample(
        key, None, score_fn=score_fn, sde=sde, shape=(20_000, 2), num_steps=num_steps,
        corrector="none", denoise=False, eps=EPS))(jax.random.key(0))
    excess = 1 - (5.0 / 0.01) ** (-2 / num_steps)
    check_moments(x, np.zeros(2), float(sde.sigma(jnp.array(EPS))) ** 2 * (1 + excess), bias=0)


def test_euler_maruyama_with_denoising():
    """Denoised samples are E[x0 | x_eps]: mean mu, variance s0^2 (alpha^2 s0^2 / v_eps)."""
    sde = SubVPSDE()
    mu, s0 = jnp.array([1.0, -2.0]), 0.5
    x = jax.jit(lambda key: sampling.pc_sample(
        key, None, score_fn=gaussian_score(sde, mu, s0), sde=sde, shape=(20_000, 2),
        num_steps=500, predictor="euler_maruyama", corrector="none", eps=EPS))(
            jax.random.key(1))
    _, var_eps = marginal(sde, mu, s0, EPS)
    alpha = float(sde.alpha(jnp.array(EPS)))
    check_moments(x, mu, s0**2 * alpha**2 * s0**2 / var_eps, bias=0.01)


VE_TOY = VESDE(sigma_min=0.01, sigma_max=5.0)


@pytest.mark.parametrize("sde,predictor,corrector_steps",
                         [(VPSDE(), "reverse_diffusion", 1), (VE_TOY, "none", 4)],
                         ids=["vp_pc", "ve_corrector_only"])
def test_langevin_corrector(sde, predictor, corrector_steps):
    """Langevin with step 2 (r ||z|| / ||s||)^2 on a Gaussian of variance v has stationary
    variance v / (1 - r^2) as D grows (+2.6% at r = 0.16), plus O(1/D) from per-sample norms:
    allowance 0 to +8% at D = 256. Corrector only (annealed Langevin) needs a few steps per
    level to track the shrinking variance."""
    dims, n = 256, 250
    mu, s0 = jnp.linspace(-1.0, 1.0, dims), 0.3
    x = jax.jit(lambda key: sampling.pc_sample(
        key, None, score_fn=gaussian_score(sde, mu, s0), sde=sde, shape=(n, dims),
        num_steps=300, predictor=predictor, corrector="langevin", snr=0.16, denoise=False,
        corrector_steps=corrector_steps, eps=EPS))(jax.random.key(2))
    mean, var = marginal(sde, mu, s0, EPS)
    np.testing.assert_allclose(x.mean(0), mean, atol=4.5 * np.sqrt(var / n))
    ratio = float(x.var(0).mean()) / var
    tol = 4 * np.sqrt(2 / (n * dims))
    assert 1 - tol < ratio < 1.08 + tol, ratio


@pytest.mark.parametrize("sde", [VE_TOY, VPSDE(), SubVPSDE()], ids=["ve", "vp", "subvp"])
def test_tweedie_denoise_is_the_posterior_mean(sde):
    """For x0 ~ N(mu, s0^2 I): E[x0 | x_t] = mu + (alpha s0^2 / v_t) (x_t - alpha mu)."""
    mu, s0 = jnp.array([1.0, -2.0]), 0.5
    t = jnp.array([0.05, 0.3, 0.7])
    x = jax.random.normal(jax.random.key(9), (3, 2))
    alpha = sde.alpha(t)[:, None]
    v = jnp.square(alpha * s0) + jnp.square(sde.std(t))[:, None]
    score = gaussian_score(sde, mu, s0)(None, x, t)
    np.testing.assert_allclose(sampling.tweedie_denoise(sde, score, x, t),
                               mu + alpha * s0**2 / v * (x - alpha * mu), rtol=1e-5, atol=1e-6)


def test_samples_depend_only_on_their_own_key():
    """Per-sample keys: permuting the keys permutes the samples (no batch coupling), and
    pc_sample is pc_sample_per_key on split keys. Also checks the dropout keys and progress."""
    sde, traced_keys, reports = VPSDE(), [], []

    def score_fn(params, x, t, key=None):
        traced_keys.append(key)
        return -x

    kwargs = dict(score_fn=score_fn, sde=sde, num_steps=40, corrector_steps=2)
    keys = jax.random.split(jax.random.key(3), 8)
    run = jax.jit(lambda keys: sampling.pc_sample_per_key(None, keys, shape=(3,), **kwargs))
    full, reverse = run(keys), run(keys[::-1])
    np.testing.assert_allclose(reverse, full[::-1], rtol=1e-6)
    assert full.shape == (8, 3) and all(k is None for k in traced_keys)

    traced_keys.clear()
    with_dropout = jax.jit(lambda key: sampling.pc_sample(
        key, None, shape=(8, 3), dropout_key=jax.random.key(5),
        progress=lambda step, total: reports.append((step, total)), **kwargs))(
            jax.random.key(3))
    jax.effects_barrier()
    np.testing.assert_allclose(with_dropout, full, rtol=1e-6)
    assert traced_keys and all(k is not None for k in traced_keys)
    assert reports == [(2 * i, 40) for i in range(1, 21)]


def test_invalid_names():
    sde = VPSDE()
    with pytest.raises(ValueError, match="predictor"):
        sampling.pc_sample(jax.random.key(0), None, score_fn=gaussian_score(sde, 0.0, 1.0),
                           sde=sde, shape=(2, 2), num_steps=4, predictor="ancestral")
    with pytest.raises(ValueError, match="corrector"):
        sampling.pc_sample(jax.random.key(0), None, score_fn=gaussian_score(sde, 0.0, 1.0),
                           sde=sde, shape=(2, 2), num_steps=4, corrector="ald")


def test_ode_sampler_ve_point_mass_is_a_rescaling():
    """With p_t = N(0, sigma(t)^2 I) the probability-flow ODE is x' = x sigma'/sigma, so
    x_eps = z sigma(eps) / sigma_max exactly, per sample; Tweedie denoising then gives 0."""
    sde = VESDE(sigma_min=0.01, sigma_max=5.0)
    run = jax.jit(lambda key, denoise: sampling.ode_sample(
        key, None, score_fn=gaussian_score(sde, jnp.zeros(2), 0.0), sde=sde, shape=(64, 2),
        eps=EPS, denoise=denoise), static_argnums=1)
    key = jax.random.key(6)
    x, nfe = run(key, False)
    z = sde.prior_sample(key, (64, 2))
    # The solver's atol (1e-5) bounds the absolute error of these ~1e-3 values.
    np.testing.assert_allclose(x, z * float(sde.sigma(jnp.array(EPS))) / 5.0, rtol=1e-3,
                               atol=1e-5)
    assert nfe.shape == (64,) and nfe.dtype == jnp.int32 and np.all(nfe > 10)
    denoised, nfe_denoised = run(key, True)
    np.testing.assert_allclose(denoised, 0.0, atol=1e-6)
    np.testing.assert_array_equal(nfe_denoised, nfe + 1)


def test_ode_sampler_vp_gaussian():
    """The flow maps N(m_T, v_T) to N(m_eps, v_eps) by x = m_eps + (z - m_T) sqrt(v_eps / v_T).
    The prior N(0, I) differs from p_T slightly, so compare the map per sample and the
    moments against the map's image of the prior."""
    sde, mu, s0, n = VPSDE(), jnp.array([1.0, -2.0]), 0.5, 2000
    z = sde.prior_sample(jax.random.key(7), (n, 2))
    x, nfe = jax.jit(lambda z: sampling.ode_sample_from_prior(
        None, z, score_fn=gaussian_score(sde, mu, s0), sde=sde, eps=EPS))(z)
    m_t, v_t = marginal(sde, mu, s0, 1.0)
    m_eps, v_eps = marginal(sde, mu, s0, EPS)
    expected = m_eps + (z - m_t) * np.sqrt(v_eps / v_t)
    np.testing.assert_allclose(x, expected, rtol=1e-3, atol=1e-3 * np.sqrt(v_eps))
    check_moments(x, m_eps + (0 - m_t) * np.sqrt(v_eps / v_t), v_eps / v_t, bias=0.0)
    assert np.all(nfe > 10) and np.all(nfe < 1000)


def _eight_gaussians_score(sde):
    """The exact score of the 8-Gaussians data set (8 clusters of std 1/sqrt(2) at radius
    8/sqrt(2)) perturbed by the SDE: a perfectly trained toy model."""
    angles = np.arange(8) * np.pi / 4
    centres = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], 1) * 8 / np.sqrt(2),
                          jnp.float32)

    def score_fn(params, x, t, key=None):
        var = 0.5 + jnp.square(sde.std(t))[:, None, None]
        diff = x[:, None, :] - centres[None]
        weights = jax.nn.softmax(-jnp.sum(jnp.square(diff), -1) / (2 * var[..., 0]), axis=1)
        return jnp.sum(weights[..., None] * (-diff / var), axis=1)

    return score_fn


def test_toy_pc_samples_stay_within_the_data_by_default():
    """With the toy config's PC settings, samples of the exact 8-Gaussians score stay within
    the data's range (radius < 8.5); the Langevin corrector's step-size rule, made for high
    dimension, throws many far outside in 2D (and is warned about)."""
    config = config_lib.toy_config("gaussians8", "usbm")
    model = experiment.build_score_model(config)
    model = dataclasses.replace(model, score_fn=_eight_gaussians_score(model.sde))
    mesh = parallel.make_mesh()

    def radii(**overrides):
        settings = registry.settings_from_config(config.sampling, "pc", **overrides)
        sample_fn = registry.make_sampler(model, mesh, "pc", batch_size=256, **settings)
        x, _ = sample_fn({}, streams.stream_key(0, "sample"), 256)
        return np.linalg.norm(x, axis=1)

    assert radii().max() < 8.5
    with pytest.warns(UserWarning, match="Langevin corrector.*2 dimensions"):
        assert np.mean(radii(corrector="langevin") > 10) > 0.05
