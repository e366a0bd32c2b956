"""Reduced versions of experiments 1 (Gaussian example) and 4 (untied autoencoder)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qcsbm_jax import asymmetry
from qcsbm_jax.experiments import autoencoder as ae
from qcsbm_jax.experiments import gaussian_example as ge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, variant: str | None = "smoke"):
    spec = importlib.util.spec_from_file_location(f"_{name}_config",
                                                  os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _problem(floor: float = 1e-8):
    config = _config("gaussian_example")
    config.floor = floor
    return ge.make_problem(config, jnp.float64)


def _quadrature(problem, nodes_per_panel=12, num_angles=128):
    """Smoke-size quadrature: (points [M, 2], log weights of p and mu, masses)."""
    edges = _config("gaussian_example").quadrature.radial_edges
    points, area = ge.polar_quadrature(edges, nodes_per_panel, num_angles)
    points = jnp.asarray(points)
    return (points,) + ge.density_weights(points, jnp.log(jnp.asarray(area)), problem)


@jax.jit
def _monte_carlo_score_error(key, eps, problem):
    """1/2 E_p|u|^2 from 400k points of q = (p + mu) / 2 (defensive importance sampling)."""
    n = 200_000
    k_p, k_mode, k_mu = jax.random.split(key, 3)
    from_p = problem.sigma * jax.random.normal(k_p, (n, 2), jnp.float64)
    modes = jax.random.randint(k_mode, (n,), 0, problem.means.shape[0])
    from_mu = problem.means[modes] + jax.random.normal(k_mu, (n, 2), jnp.float64)
    x = jnp.concatenate([from_p, from_mu])
    log_q = jnp.logaddexp(ge.log_target(x, problem.sigma), ge.log_mixture(x, problem.means))
    log_u_sq = ge.log_coefficient_sq(x, eps, problem) + jnp.log(jnp.sum(x**2, -1))
    return jnp.mean(jnp.exp(ge.log_target(x, problem.sigma) - log_q + log_u_sq))


def test_polar_quadrature_integrates_both_densities(x64):
    points, area = ge.polar_quadrature((0.0, 1.0, 3.0), 8, 64)
    assert points.shape == (2 * 8 * 64, 2)
    np.testing.assert_allclose(area.sum(), np.pi * 9.0, rtol=1e-12)
    _, _, masses = _quadrature(_problem())
    np.testing.assert_allclose([masses["p"], masses["mu"]], 1.0, atol=1e-5)


def test_exact_score_when_eps_is_zero(x64):
    problem = _problem()
    x = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64) * 3
    for field in ge.FIELDS:
        np.testing.assert_array_equal(ge.score(x, 0.0, problem, field), -x / problem.sigma**2)


@pytest.mark.parametrize("floor, expected, rtol", [(0.0, 1.0, 0.01), (1e-8, 0.003, 0.1)])
def test_score_error_by_quadrature_and_monte_carlo(x64, floor, expected, rtol):
    """1/2 E_p|u|^2 / eps: ~1 for the exact formula, ~0.003 with the floor delta = 1e-8."""
    eps, problem = 1e-3, _problem(floor)
    points, log_weights, _ = _quadrature(problem)
    by_quadrature = ge.score_error(eps, points, log_weights["p"], problem) / eps
    by_monte_carlo = _monte_carlo_score_error(jax.random.key(1), eps, problem) / eps
    np.testing.assert_allclose(by_quadrature, expected, rtol=0.05)
    np.testing.assert_allclose(by_monte_carlo, by_quadrature, rtol=rtol)


def test_radial_field_is_conservative_where_p_lives_and_rotational_is_not(x64):
    problem = _problem()
    points, log_weights, _ = _quadrature(problem)
    metrics = jax.jit(ge.field_metrics, static_argnums=4)
    rotational, radial = (metrics(1e-3, points, log_weights, problem, field)
                          for field in ge.FIELDS)
    assert rotational["asym_p"] > 1e-3 and rotational["asym_mu"] > 1e3
    assert radial["asym_p"] < 1e-12 * rotational["asym_p"]
    assert radial["nasym_p"] < 1e-15
    # Not exactly conservative where mu lives: mu has a 10-fold symmetry only.
    assert 0 < radial["asym_mu"] < 1e-2 * rotational["asym_mu"]
    assert 0 < radial["nasym_mu"] < rotational["nasym_mu"] < 1


def test_asymmetry_is_the_squared_curl_of_the_rotational_perturbation(x64):
    """Asym = (2 c + x . grad c)^2 for u = c (-x2, x1), grad c by autodiff of c alone."""
    problem = _problem()
    x = 0.3 * jax.random.normal(jax.random.key(2), (32, 2), jnp.float64)

    @jax.jit
    def asym_and_curl(x):
        def coefficient(y):
            return jnp.exp(0.5 * ge.log_coefficient_sq(y, 1e-3, problem))

        curl = 2 * coefficient(x) + jnp.sum(x * jax.vmap(jax.grad(coefficient))(x), -1)
        jacobian = asymmetry.full_jacobian(
            lambda y: ge.score(y, 1e-3, problem, "rotational"), x)
        return asymmetry.asymmetry(jacobian), curl**2

    np.testing.assert_allclose(*asym_and_curl(x), rtol=1e-9)


def _simulate(field, epsilons, floor=1e-8, num_steps=300, num_seeds=2):
    """Particle runs in float64: (clipped readings [E, S, T + 1], steps name -> [E, S])."""
    config = _config("gaussian_example")
    config.num_seeds = num_seeds
    s = config.sampling
    with jax.enable_x64(True):
        _, readings, steps = ge.simulate(
            jnp.asarray(epsilons, jnp.float64), ge.initial_particles(config, jnp.float64),
            _problem(floor), field, num_steps, s.step_size, s.step_size_exact, s.decay,
            config.threshold)
    return np.asarray(readings["clipped"]), {k: np.asarray(v) for k, v in steps.items()}


def test_particles_converge_in_one_step_with_the_exact_score():
    for field in ge.FIELDS:
        readings, steps = _simulate(field, [0.0], num_steps=5)
        assert (steps["clipped"] == 1).all() and (steps["relative"] == 1).all()
        assert (readings[:, :, 0] > 100).all() and (readings[:, :, 1:] == 0).all()


def test_rotational_field_needs_many_more_steps():
    _, rotational = _simulate("rotational", [2.25e-3], num_seeds=1)
    _, radial = _simulate("radial", [2.25e-3], num_seeds=1)
    assert (radial["clipped"] > 0).all()
    assert (rotational["clipped"] > 5 * radial["clipped"]).all()


def test_exact_formula_without_floor_diverges():
    for field in ge.FIELDS:
        readings, steps = _simulate(field, [1e-3], floor=0.0, num_steps=20, num_seeds=1)
        assert (steps["clipped"] == -1).all() and np.isinf(readings[..., -1]).all()


def test_first_step_below():
    curve = jnp.asarray([5.0, 2.0, 0.5, 0.1, 0.0])
    assert int(ge.first_step_below(curve, 0.6)) == 2
    assert int(ge.first_step_below(curve, -1.0)) == -1


def _params(w, r, b=(0.3, -0.2), c=(0.1, 0.4), beta=(1.0, 1.5)):
    return {"W": jnp.asarray(w), "R": jnp.asarray(r), "b": jnp.asarray(b),
            "c": jnp.asarray(c), "h": {"beta": jnp.asarray(beta)}}


def test_autoencoder_jacobian_is_r_diag_hprime_wt():
    graphdef, params = ae.init_params(jax.random.split(jax.random.key(0), 1),
                                      _config("autoencoder").model)
    params = jax.tree.map(lambda a: a[0], params)
    x = ae.grid(5, 3.0)
    jacobian = asymmetry.full_jacobian(nnx.merge(graphdef, params), x)
    z = x @ params["W"] + params["b"]
    beta = params["h"]["beta"]
    gate = jax.nn.sigmoid(beta * z)
    h_prime = gate + beta * z * gate * (1 - gate)
    expected = jnp.einsum("ik,bk,jk->bij", params["R"], h_prime, params["W"])
    np.testing.assert_allclose(jacobian, expected, rtol=1e-5, atol=1e-6)


def test_parallel_columns_give_a_conservative_field_with_untied_weights():
    graphdef, _ = ae.init_params(jax.random.split(jax.random.key(0), 1),
                                 _config("autoencoder").model)
    w = jnp.asarray([[0.8, -0.3], [0.2, 0.9]])
    params = _params(w, w * jnp.asarray([2.0, -0.5]))  # R = W diag(2, -0.5)
    norms = ae.weight_norms(params)
    assert float(ae.qc_loss(params, graphdef, ae.grid(10, 10.0))) < 1e-10
    assert float(norms["commutator"]) < 1e-6 and float(norms["difference"]) > 1.0
    np.testing.assert_allclose(ae.column_alignment(params), 1.0, rtol=1e-6)


def test_autoencoder_training_shrinks_the_commutator_not_the_difference():
    final, records = ae.run(_config("autoencoder"))
    assert records["loss"].shape == (2, 301)
    assert (records["loss"][:, -1] < 0.9 * records["loss"][:, 0]).all()
    assert (records["commutator"][:, -1] < 0.95 * records["commutator"][:, 0]).all()
    assert (records["difference"].min(axis=1) > 0.3).all()
    # Adam with lr 1e-4 moves each weight by at most a few lr per step.
    initial = ae.init_params(jax.random.split(jax.random.key(0), 2), _config("autoencoder").model)
    moved = np.abs(final["W"] - np.asarray(initial[1]["W"]))
    assert 0 < moved.max() < 300 * 1e-4 * 3.2


@pytest.mark.parametrize("name", ["gaussian_example", "autoencoder"])
def test_command_line_smoke_run(tmp_path, name):
    command = [sys.executable, "-m", f"qcsbm_jax.experiments.{name}",
               f"--config={os.path.join(ROOT, 'configs', name + '.py')}:smoke",
               f"--workdir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    if name == "gaussian_example":
        assert {"table.md", "trajectories.png", "nll.png"} <= set(os.listdir(tmp_path))
        for field in ge.FIELDS:
            assert results["fields"][field]["steps"]["clipped"][0] == [1, 1]
    else:
        assert os.path.getsize(tmp_path / "curves.png") > 0
        assert all(c < i for c, i in zip(results["final"]["commutator"],
                                         results["initial"]["commutator"]))
