"""Fixed-step solvers (sampling.solvers) against exact answers on Gaussian data.

Data N(mu, diag(s0^2)) has marginals N(m(t), diag(v(t))), m = alpha mu,
v = alpha^2 s0^2 + std^2, and score -(x - m) / v. Every SDE here has v' = 2 f v + g^2 with
f = d log alpha / dt, so the probability-flow ODE dx/dt = f x + g^2 (x - m) / (2 v) moves
y = x - m as y' = y v' / (2 v): y / sqrt(v) is constant and a prior draw z ends at
  x(eps) = m(eps) + (z - m(T)) sqrt(v(eps) / v(T))   (exactly, per coordinate).
Stochastic samplers are compared with the marginal at eps; their SDEs have T large enough
(VE sigma_max 500, VP/sub-VP beta_max 30) that p_T and the prior differ by far less than
the standard error, and enough steps that their weak (first-order) bias stays under about
1.5 standard errors of these 20k samples (measured with 200k: EDM churn at 256 steps,
Euler-Maruyama at 500), well inside the 4-standard-error tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcsbm_jax import config as config_lib, experiment, parallel, sampling
from qcsbm_jax.sampling import solvers
from qcsbm_jax.sde import SDE, SubVPSDE, VESDE, VPSDE
from test_parallel import _meshes
from test_sampling import gaussian_score, marginal

EPS = 1e-3
MU, S0 = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 0.05])
SDES = {"ve": VESDE(sigma_min=0.01, sigma_max=50.0), "vp": VPSDE(), "subvp": SubVPSDE()}
ORDERS = {"euler": 1, "heun": 2, "dpm_solver_2m": 2}


def prior_draws(sde, keys, shape):
    """The prior draw of each key, as the solvers make it (first half of its split)."""
    return jax.vmap(lambda k: sde.prior_sample(jax.random.split(k)[0], shape))(keys)


@pytest.mark.parametrize("name", SDES)
def test_noise_level_time_inverts_noise_level(name):
    sde = SDES[name]
    t = jnp.linspace(EPS, 1.0, 101)
    level = sde.noise_level(t)
    np.testing.assert_allclose(level, sde.std(t) / sde.alpha(t), rtol=1e-6)
    assert np.all(np.diff(level) > 0)
    np.testing.assert_allclose(sde.noise_level_time(level), t, rtol=2e-5)


def test_rho_grid():
    sde, n = SDES["vp"], 10
    hi, lo = float(sde.noise_level(jnp.float32(1.0))), float(sde.noise_level(jnp.float32(EPS)))
    grid = np.array([solvers.rho_grid(sde, n, EPS, 7.0)(i) for i in range(n + 1)])
    expected = (hi ** (1 / 7) + np.arange(n + 1) / n * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    np.testing.assert_allclose(grid, expected, rtol=2e-5)
    linear = [solvers.rho_grid(sde, n, EPS, 1.0)(i) for i in range(n + 1)]
    np.testing.assert_allclose(linear, np.linspace(hi, lo, n + 1), rtol=2e-5)


@pytest.mark.parametrize("method", ORDERS)
@pytest.mark.parametrize("name", SDES)
def test_ode_solver_error_falls_at_its_order(name, method):
    """RMS error against the exact endpoint for 8..128 steps: log-log slope -order.
    One compilation serves every step count (num_steps traced)."""
    sde, steps = SDES[name], (8, 16, 32, 64, 128)
    keys = jax.random.split(jax.random.key(0), 256)
    z = prior_draws(sde, keys, (3,))
    m_t, v_t = marginal(sde, MU, S0, sde.T)
    m_eps, v_eps = marginal(sde, MU, S0, EPS)
    exact = m_eps + (z - m_t) * jnp.sqrt(v_eps / v_t)
    kwargs = dict(score_fn=gaussian_score(sde, MU, S0), sde=sde, shape=(3,), eps=EPS,
                  denoise=False)
    run = jax.jit(lambda keys, n: sampling.SOLVERS[method](None, keys, num_steps=n, **kwargs))
    errors = []
    for n in steps:
        x, nfe = run(keys, n)
        errors.append(float(jnp.sqrt(jnp.mean(jnp.square(x - exact)))))
        np.testing.assert_array_equal(nfe, (2 if method == "heun" else 1) * n)
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope + ORDERS[method]) < 0.2, (slope, errors)
    assert errors[-1] < (4e-2 if method == "euler" else 2e-3), errors


def test_static_and_traced_num_steps_agree():
    sde, keys = SDES["subvp"], jax.random.split(jax.random.key(8), 8)
    kwargs = dict(score_fn=gaussian_score(sde, MU, S0), sde=sde, shape=(3,))
    settings = {"edm_stochastic": dict(s_churn=10.0), "dpm_solver_2m": {},
                "euler_maruyama": {}}

    def run_all(keys, num_steps):
        return [sampling.SOLVERS[m](None, keys, num_steps=num_steps, **kwargs, **kw)[0]
                for m, kw in settings.items()]

    static = jax.jit(lambda keys: run_all(keys, 5))(keys)
    traced = jax.jit(run_all)(keys, 5)
    for a, b in zip(static, traced):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


STOCHASTIC_SDES = {"ve": VESDE(sigma_min=0.01, sigma_max=500.0),
                   "vp": VPSDE(beta_max=30.0), "subvp": SubVPSDE(beta_max=30.0)}


@pytest.mark.parametrize("method, num_steps, settings", [
    ("edm_stochastic", 256, dict(s_churn=80.0, s_tmin=0.05, s_tmax=1.0)),
    ("euler_maruyama", 500, {}),
], ids=["edm_stochastic", "euler_maruyama"])
@pytest.mark.parametrize("name", STOCHASTIC_SDES)
def test_stochastic_sampler_moments(name, method, num_steps, settings):
    """Mean, variances and covariance of 20k samples at eps within 4 standard errors
    (mean sqrt(v / n), variance v sqrt(2 / n), covariance sqrt(v1 v2 / n))."""
    sde, n = STOCHASTIC_SDES[name], 20_000
    mu, s0 = jnp.array([1.0, -1.0]), jnp.array([0.5, 1.0])
    x, nfe = jax.jit(lambda keys: sampling.SOLVERS[method](
        None, keys, score_fn=gaussian_score(sde, mu, s0), sde=sde, shape=(2,),
        num_steps=num_steps, eps=EPS, denoise=False, **settings))(
            jax.random.split(jax.random.key(1), n))
    mean, var = (np.asarray(a) for a in marginal(sde, mu, s0, EPS))
    cov = np.cov(np.asarray(x).T)
    assert np.all(np.abs(np.asarray(x.mean(0)) - mean) < 4 * np.sqrt(var / n)), x.mean(0)
    assert np.all(np.abs(np.diag(cov) / var - 1) < 4 * np.sqrt(2 / n)), np.diag(cov) / var
    assert abs(cov[0, 1]) < 4 * np.sqrt(var[0] * var[1] / n), cov
    np.testing.assert_array_equal(nfe, (2 if method == "edm_stochastic" else 1) * num_steps)


@pytest.mark.parametrize("method", ["heun", "dpm_solver_2m", "euler_maruyama"])
def test_denoise_is_one_tweedie_step_at_eps(method):
    """denoise=True returns E[x0 | x_eps] of the denoise=False sample, for one more NFE."""
    sde, keys = SDES["vp"], jax.random.split(jax.random.key(2), 8)
    (x, nfe), (denoised, nfe_denoised) = jax.jit(lambda keys: [sampling.SOLVERS[method](
        None, keys, score_fn=gaussian_score(sde, MU, S0), sde=sde, shape=(3,), num_steps=6,
        eps=EPS, denoise=denoise) for denoise in (False, True)])(keys)
    t = jnp.full((8,), EPS)
    expected = sampling.tweedie_denoise(sde, gaussian_score(sde, MU, S0)(None, x, t), x, t)
    np.testing.assert_allclose(denoised, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nfe_denoised, nfe + 1)


def test_edm_stochastic_without_churn_is_heun():
    sde, keys = SDES["ve"], jax.random.split(jax.random.key(3), 8)
    kwargs = dict(score_fn=gaussian_score(sde, MU, S0), sde=sde, shape=(3,), num_steps=5)
    churn_free, outside_window, heun = jax.jit(lambda keys: (
        sampling.SOLVERS["edm_stochastic"](None, keys, s_churn=0.0, **kwargs),
        sampling.SOLVERS["edm_stochastic"](None, keys, s_churn=40.0, s_tmin=1e3, s_tmax=1e4,
                                           **kwargs),
        sampling.SOLVERS["heun"](None, keys, **kwargs)))(keys)
    for x, nfe in (churn_free, outside_window):
        np.testing.assert_allclose(x, heun[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(nfe, heun[1])


def test_euler_maruyama_is_the_pc_predictor_alone():
    """The same chain as pc_sample_per_key(predictor='euler_maruyama', corrector='none'),
    which implements it separately."""
    sde, keys = SDES["subvp"], jax.random.split(jax.random.key(4), 8)
    kwargs = dict(score_fn=gaussian_score(sde, MU, S0), sde=sde, shape=(3,), num_steps=20,
                  eps=EPS)
    (x, nfe), pc = jax.jit(lambda keys: (
        sampling.SOLVERS["euler_maruyama"](None, keys, **kwargs),
        sampling.pc_sample_per_key(None, keys, predictor="euler_maruyama", corrector="none",
                                   **kwargs)))(keys)
    np.testing.assert_allclose(x, pc, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(nfe, 21)


def test_same_on_1_and_8_devices():
    """Per-sample keys: every solver, jitted per shard over one device and over 4 x 2
    devices (2 rows per shard), gives the same samples up to float32 round-off."""
    sde = SDES["vp"]
    keys = jax.random.key_data(jax.random.split(jax.random.key(5), 16))

    def sample_all(params, key_data):
        return {method: fn(params, jax.random.wrap_key_data(key_data),
                           score_fn=gaussian_score(sde, MU, S0), sde=sde, shape=(3,),
                           num_steps=4, **(dict(s_churn=10.0) if method == "edm_stochastic"
                                           else {}))
                for method, fn in sampling.SOLVERS.items()}

    results = {}
    for mesh_name, mesh in _meshes().items():
        run = jax.jit(parallel.per_shard(sample_all, mesh, num_replicated=1, num_batched=1))
        key_data = jax.device_put(keys, parallel.data_sharding(mesh))
        results[mesh_name] = jax.tree.map(np.asarray, run(None, key_data))
    for method in sampling.SOLVERS:
        (x1, nfe1), (x8, nfe8) = results["1"][method], results["4x2"][method]
        np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-6, err_msg=method)
        np.testing.assert_array_equal(nfe8, nfe1)


def test_solvers_run_the_toy_network():
    """The toy MLP's score_fn (key None): finite samples of the right shape and NFE, for
    each solver family (euler and heun share edm_stochastic's loop)."""
    model = experiment.build_score_model(config_lib.toy_config("gaussians8", "usbm", "smoke"))
    settings = {"edm_stochastic": dict(s_churn=10.0), "dpm_solver_2m": {},
                "euler_maruyama": {}}
    out = jax.jit(lambda k: {method: sampling.SOLVERS[method](
        model.init_params, k, score_fn=model.score_fn, sde=model.sde,
        shape=model.data_shape, num_steps=3, **kw) for method, kw in settings.items()})(
            jax.random.split(jax.random.key(6), 4))
    for method, (x, nfe) in out.items():
        assert x.shape == (4, 2) and np.all(np.isfinite(x)), method
        np.testing.assert_array_equal(nfe, {"edm_stochastic": 7}.get(method, 4))


class _NoNoiseLevelSDE(SDE):
    """An SDE without the noise-level inverse the ODE solvers need."""
    prior_std = 1.0

    def sde(self, x, t):
        return jnp.zeros_like(x), jnp.ones_like(t)


@pytest.mark.parametrize("method, sde, num_steps, settings, match", [
    ("ddim", SDES["vp"], 10, {}, "Unknown sampling method 'ddim'"),
    ("heun", SDES["vp"], 10, dict(s_churn=1.0), r"'heun' has no setting \['s_churn'\]"),
    ("dpm_solver_2m", SDES["vp"], 1, {}, "num_steps=1 is too few for dpm_solver_2m"),
    ("euler", SDES["vp"], 0, {}, "num_steps >= 1"),
    ("heun", _NoNoiseLevelSDE(), 10, {}, "_NoNoiseLevelSDE lacks"),
    ("euler", SDES["ve"], 10, dict(eps=0.0), r"sampling.eps=0.0 must lie in \(0, T"),
    ("dpm_solver_2m", SDES["ve"], 10, dict(rho=0.0), "sampling.rho=0.0 must be > 0"),
    ("edm_stochastic", SDES["ve"], 10, dict(s_tmin=2.0, s_tmax=1.0), "s_tmin=2.0 must be in"),
    ("edm_stochastic", SDES["ve"], 10, dict(s_churn=-1.0), "s_churn=-1.0 must be >= 0"),
])
def test_bad_settings_raise_one_clear_error(method, sde, num_steps, settings, match):
    with pytest.raises(ValueError, match=match):
        sampling.check_settings(method, sde, num_steps, **settings)


def test_euler_maruyama_applies_to_any_sde_and_solvers_check_their_arguments():
    sampling.check_settings("euler_maruyama", _NoNoiseLevelSDE(), 10)
    keys = jax.random.split(jax.random.key(7), 2)
    with pytest.raises(ValueError, match="too few for dpm_solver_2m"):
        sampling.SOLVERS["dpm_solver_2m"](None, keys, score_fn=gaussian_score(
            SDES["vp"], MU, S0), sde=SDES["vp"], shape=(3,), num_steps=1)


@pytest.mark.parametrize("overrides, match", [
    (dict(method="dpm_solver_2m", num_steps=1), "too few for dpm_solver_2m"),
    (dict(method="ddim"), "sampling.method='ddim' is not valid"),
    (dict(method="edm_stochastic", s_tmin=5.0), "s_tmin=5.0 must be in"),
])
def test_config_validate_checks_solver_settings(overrides, match):
    for config in (config_lib.toy_config("gaussians8", "usbm"),
                   config_lib.image_config("fashion_mnist", "usbm", "smoke")):
        config.sampling.update(method="heun")
        config_lib.validate(config)
        config.sampling.update(overrides)
        with pytest.raises(ValueError, match=match):
            config_lib.validate(config)


def test_benchmark_script_runs():
    """benchmarks/solvers.py on a tiny toy batch, so the unit-cost table keeps working."""
    from benchmarks import solvers as bench
    rows = bench.bench_model("toy", batch=16, num_steps=2, rounds=1)
    assert [r["method"] for r in rows] == list(sampling.SOLVERS)
    assert [r["nfe"] for r in rows] == [3, 5, 5, 3, 3]
    assert all(r["ratio"] > 0 and len(r["ratios"]) == 1 for r in rows)
    assert "| toy | 16 | heun | 2 | 5 |" in bench.format_table(rows)
