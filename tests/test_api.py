"""The notebook front door: qcsbm_jax.load(workdir) and the Run's jitted programs, against
the library pieces they wrap."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qcsbm_jax
from qcsbm_jax import asymmetry, config as config_lib, experiment, parallel, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = config_lib.toy_config("gaussians8", "qcsbm", "smoke")
    with config.unlocked():
        config.training.num_steps = 20
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train(config, workdir)
    return config, workdir


def test_load_reads_the_config_and_parameters_of_the_run(trained):
    config, workdir = trained
    run = qcsbm_jax.load(workdir)
    assert run.config.to_dict() == config.to_dict() and run.step == 20
    assert "QCSBM toy_mlp on gaussians8" in repr(run) and "step 20" in repr(run)
    raw = qcsbm_jax.load(workdir, params="raw")
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(raw.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)  # no EMA in the toy setting
    with pytest.raises(ValueError, match="'ema', 'raw'"):
        qcsbm_jax.load(workdir, params="average")


def test_load_of_an_empty_workdir_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="Train first"):
        qcsbm_jax.load(str(tmp_path))


def test_score_is_the_models_score(trained):
    config, workdir = trained
    run = qcsbm_jax.load(workdir)
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32) * 4
    want = run.model.score_fn(run.params, jnp.asarray(x), jnp.full((5,), 0.3), None)
    np.testing.assert_allclose(run.score(x, 0.3), want, rtol=1e-6)
    np.testing.assert_allclose(run.score(x, np.full(5, 0.3)), want, rtol=1e-6)


def _counting(run: qcsbm_jax.Run) -> tuple[qcsbm_jax.Run, list]:
    """A Run whose score function counts its traces (one per compiled program)."""
    traces, score_fn = [], run.model.score_fn

    def counted(params, x, t, key=None):
        traces.append(x.shape)
        return score_fn(params, x, t, key)

    model = dataclasses.replace(run.model, score_fn=counted)
    return qcsbm_jax.Run(run.config, model, run.params, run.step, run.mesh), traces


@pytest.mark.parametrize("method", ["ode", "pc", "heun"])
def test_sample_i_does_not_depend_on_n_and_a_bucket_compiles_once(trained, method):
    _, workdir = trained
    run, traces = _counting(qcsbm_jax.load(workdir))
    overrides = {} if method == "ode" else {"num_steps": 10}
    few, info = run.sample(9, method=method, seed=3, **overrides)
    traced = len(traces)
    more, more_info = run.sample(13, method=method, seed=3, **overrides)  # same bucket of 16
    assert len(traces) == traced  # nothing compiled again
    assert few.shape == (9, 2) and more.shape == (13, 2) and info["nfe"].shape == (9,)
    np.testing.assert_allclose(more[:9], few, rtol=1e-5, atol=1e-5)
    assert info["method"] == method and info["step"] == 20
    if method != "ode":  # pc without corrector: N + denoising; heun: 2N + denoising
        assert np.all(info["nfe"] == (10 if method == "pc" else 20) + 1)
        assert info["settings"]["num_steps"] == 10
    other, _ = run.sample(9, method=method, seed=4, **overrides)
    assert not np.allclose(other, few)
    run.sample(20, method=method, seed=3, **overrides)  # the next bucket (32)
    assert len(traces) > traced


def test_sample_rejects_a_setting_the_sampler_does_not_take(trained):
    run = qcsbm_jax.load(trained[1])
    with pytest.raises(ValueError, match="takes no setting.*snr"):
        run.sample(4, method="ode", snr=0.1)
    with pytest.raises(ValueError, match="Unknown sampling method"):
        run.sample(4, method="ddim")
    with pytest.raises(ValueError, match="too few for dpm_solver_2m"):
        run.sample(4, method="dpm_solver_2m", num_steps=1)


def test_log_likelihood_matches_the_evaluation_program(trained):
    config, workdir = trained
    run = qcsbm_jax.load(workdir)
    x = np.random.default_rng(1).standard_normal((6, 2)).astype(np.float32) * 3
    result = run.log_likelihood(x)
    assert set(result) == {"nll", "nfe"} and result["nll"].shape == (6,)
    # The first three examples do not depend on the other three.
    np.testing.assert_allclose(run.log_likelihood(x[:3])["nll"], result["nll"][:3], rtol=1e-5)
    assert np.all(np.isfinite(result["nll"])) and np.all(result["nfe"] > 0)


def test_asymmetry_is_the_exact_jacobians(trained):
    _, workdir = trained
    run = qcsbm_jax.load(workdir)
    x = np.random.default_rng(2).standard_normal((7, 2)).astype(np.float32) * 3
    result = run.asymmetry(x, 0.2)
    jac = asymmetry.full_jacobian(
        lambda y: run.model.score_fn(run.params, y, jnp.full((7,), 0.2)), jnp.asarray(x))
    np.testing.assert_allclose(result["asym"], asymmetry.asymmetry(jac), rtol=1e-5)
    np.testing.assert_allclose(result["nasym"], asymmetry.normalized_asymmetry(jac), rtol=1e-5)
    assert np.all(result["asym"] > 0)


def test_hutchinson_asymmetry_for_high_dimensional_data():
    """Above asymmetry.MAX_EXACT_DIM dims the Run uses one-probe estimates, unbiased: on a
    linear field s = A x their mean over many examples is Asym of A."""
    dim, count = 100, 512
    a = np.random.default_rng(3).standard_normal((dim, dim)).astype(np.float32) / 10
    config = config_lib.toy_config("gaussians8", "usbm", "smoke")
    model = experiment.ScoreModel(experiment.build_score_model(config).sde,
                                  lambda params, x, t, key=None: x @ jnp.asarray(a).T, {},
                                  (dim,))
    run = qcsbm_jax.Run(config, model, {}, 0, parallel.make_mesh())
    x = np.random.default_rng(4).standard_normal((count, dim)).astype(np.float32)
    result = run.asymmetry(x, 0.5)
    exact = 0.5 * np.sum((a - a.T) ** 2)
    assert result["asym"].shape == (count,)
    assert abs(result["asym"].mean() - exact) < 4 * result["asym"].std() / np.sqrt(count)
