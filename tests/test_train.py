"""Train step semantics, device-count independence and exact resumption."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from qcsbm_jax import checkpoint, config as config_lib, experiment, losses, parallel, train
from qcsbm_jax.data import toy


def _smoke(family="qcsbm", **overrides):
    """The smoke config with a narrower network, so that tests compile and run quickly."""
    config = config_lib.toy_config("gaussians8", family, "smoke")
    overrides = {"model.widths": (32, 32), **overrides}
    with config.unlocked():
        for key, value in overrides.items():
            node, *path = key.split(".")
            config[node][path[0]] = value
    return config


def _step_fn(config, model):
    loss_fn = losses.make_loss_fn(model.score_fn, model.sde, qc_weight=config.loss.qc_weight,
                                  estimator=config.loss.estimator)
    optimizer = train.make_optimizer(config.optim)
    return optimizer, train.make_train_step(loss_fn, optimizer, config.optim.ema_decay)


def _keyed(fn):
    """A losses.Loss whose only randomness is the key: fn(params, batch, key)."""
    return losses.Loss(draw=lambda key, batch: key,
                       evaluate=lambda params, batch, key, step=None: fn(params, batch, key))


def _batch(config, step=0):
    data = toy.sample_toy("gaussians8", jax.random.key(0), 2048)
    return np.asarray(toy.toy_batch(data, jax.random.key(1), step, config.training.batch_size))


@pytest.mark.parametrize("family", ["csbm", "usbm", "qcsbm"])
def test_training_reduces_loss(family):
    config = _smoke(family)
    model = experiment.build_score_model(config)
    optimizer, step_fn = _step_fn(config, model)
    state = train.init_state(model.init_params, optimizer, 0)
    step_fn = jax.jit(step_fn)
    losses_seen = []
    for step in range(100):
        state, metrics = step_fn(state, _batch(config, step))
        losses_seen.append(float(metrics["loss"]))
    assert int(state.step) == 100
    assert np.mean(losses_seen[-20:]) < 0.8 * np.mean(losses_seen[:20])


def test_nonfinite_step_leaves_state_unchanged():
    def nan_loss(params, batch, key):
        loss = jnp.sum(params["w"] * batch.sum()) * jnp.nan
        return loss, {"loss": loss}

    optimizer = optax.adam(1e-3)
    state = train.init_state({"w": jnp.ones(3)}, optimizer, 0)
    new, metrics = jax.jit(train.make_train_step(_keyed(nan_loss), optimizer, 0.9))(
        state, jnp.ones((4, 2)))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new.params) + jax.tree.leaves(new.opt_state),
                    jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_penalty_every_k_steps_follows_the_host_step():
    """With qc_every=2 the selector runs the penalised program on even steps only (scaled
    by 2 there, losses.make_loss_fn) and the plain one otherwise, neither with a conditional."""
    config = _smoke("qcsbm")
    model = experiment.build_score_model(config)
    loss_fn = losses.make_loss_fn(model.score_fn, model.sde, qc_weight=0.1, estimator="exact",
                                  qc_every=2)
    optimizer = train.make_optimizer(config.optim)
    step_for = train.make_step_selector(loss_fn, optimizer, 0.0, qc_every=2)
    assert step_for(0) is step_for(2) and step_for(1) is step_for(3)
    assert step_for(0) is not step_for(1)
    state = train.init_state(model.init_params, optimizer, 0)
    penalties = []
    for step in range(4):
        program = step_for(step)
        assert " conditional(" not in program.lower(state, _batch(config, step)).as_text()
        state, metrics = program(state, _batch(config, step))
        penalties.append(float(metrics["qc"]))
    assert penalties[1] == penalties[3] == 0.0
    assert penalties[0] > 0 and penalties[2] > 0
    assert int(state.step) == 4


def test_ema_follows_its_formula():
    def loss(params, batch, key):
        value = jnp.sum((params["w"] - 1.0) ** 2)
        return value, {"loss": value}

    optimizer = optax.sgd(0.1)
    state = train.init_state({"w": jnp.zeros(2)}, optimizer, 0)
    new, _ = train.make_train_step(_keyed(loss), optimizer, 0.75)(state, jnp.ones((1, 2)))
    # One SGD step moves w from 0 to 0.2; the EMA moves a quarter of the way.
    np.testing.assert_allclose(new.params["w"], 0.2, rtol=1e-6)
    np.testing.assert_allclose(new.ema_params["w"], 0.25 * 0.2, rtol=1e-6)


def test_ema_warmup_is_the_official_schedule_and_keeps_equal_values_exactly():
    """decay_n = min(ema_decay, (1 + n) / (10 + n)) for the update that makes step n; a
    parameter that never moves (e.g. the Fourier frequencies) keeps its EMA bit for bit."""
    def loss(params, batch, key):
        value = jnp.sum((params["w"] - 1.0) ** 2)
        return value, {"loss": value}

    optim = ml_collections.ConfigDict(dict(ema_decay=0.999, ema_warmup=True))
    decay = train.ema_decay_schedule(optim)
    np.testing.assert_allclose([decay(n - 1) for n in (1, 2, 100, 10_000)],
                               [2 / 11, 3 / 12, 101 / 110, 0.999], rtol=1e-6)
    optimizer = optax.sgd(0.1)
    fixed = jnp.array([0.1, 3.7, -1.3e-5], jnp.float32)
    state = train.init_state({"w": jnp.zeros(2), "fixed": fixed}, optimizer, 0)
    step = jax.jit(train.make_train_step(_keyed(loss), optimizer, decay))
    new, _ = step(state, jnp.ones((1, 2)))
    np.testing.assert_allclose(new.ema_params["w"], (1 - 2 / 11) * 0.2, rtol=1e-6)
    for _ in range(3):
        new, _ = step(new, jnp.ones((1, 2)))
    np.testing.assert_array_equal(new.ema_params["fixed"], fixed)
    optim.ema_warmup = False
    assert train.ema_decay_schedule(optim) == 0.999


def test_mesh_and_batch_errors_are_clear():
    with pytest.raises(ValueError, match="product is the device count"):
        parallel.make_mesh(3, 1)
    with pytest.raises(ValueError, match="divisible"):
        parallel.check_batch_size(12, parallel.make_mesh())


def test_interrupted_run_resumes_exactly(tmp_path):
    """20 steps, stop, resume to 40 == 40 steps straight (same data and RNG stream)."""
    straight = _smoke("qcsbm", **{"training.num_steps": 40, "training.checkpoint_every": 20})
    interrupted = _smoke("qcsbm", **{"training.num_steps": 20, "training.checkpoint_every": 20})
    expected = train.train(straight, str(tmp_path / "straight"))
    train.train(interrupted, str(tmp_path / "resumed"))
    resumed = train.train(straight, str(tmp_path / "resumed"))
    assert int(resumed.step) == int(expected.step) == 40
    for a, b in zip(jax.tree.leaves(resumed.params) + jax.tree.leaves(resumed.opt_state),
                    jax.tree.leaves(expected.params) + jax.tree.leaves(expected.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_init_from_fine_tunes_the_parameters_of_another_run(tmp_path, monkeypatch):
    """QCSBM from a trained USBM: its params and EMA, a fresh optimizer, step 0. Relative
    workdirs, as in the image configs (init_from = runs/<dataset>_usbm_ncsnpp)."""
    monkeypatch.chdir(tmp_path)
    source = "runs/usbm"
    usbm = _smoke("usbm", **{"training.num_steps": 20, "optim.ema_decay": 0.9})
    trained = train.train(usbm, source)
    # Another optimizer (warm-up adds a schedule state): only the parameters carry over.
    qcsbm = _smoke("qcsbm", **{"training.num_steps": 0, "training.init_from": source,
                               "optim.warmup_steps": 10})
    start = train.train(qcsbm, "runs/qcsbm")
    assert int(start.step) == 0
    fresh = train.make_optimizer(qcsbm.optim).init(trained.params)
    for a, b in zip(jax.tree.leaves((start.params, start.ema_params, start.opt_state)),
                    jax.tree.leaves((trained.params, trained.ema_params, fresh))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(jax.tree.leaves(start.params)[0],
                              jax.tree.leaves(start.ema_params)[0])

    # Once the fine-tune has its own checkpoint it resumes from it; init_from is not read.
    fine_tune = _smoke("qcsbm", **{"training.num_steps": 10, "training.init_from": source})
    tuned = train.train(fine_tune, "runs/qcsbm")
    gone = _smoke("qcsbm", **{"training.num_steps": 10, "training.init_from": "/nonexistent"})
    resumed = train.train(gone, "runs/qcsbm")
    assert int(tuned.step) == int(resumed.step) == 10
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(tuned.params)):
        np.testing.assert_array_equal(a, b)


def test_init_from_refuses_another_model_or_an_empty_run(tmp_path):
    source = str(tmp_path / "usbm")
    train.train(_smoke("usbm", **{"training.num_steps": 2}), source)
    csbm = _smoke("csbm", **{"training.num_steps": 0, "training.init_from": source})
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as error:
        train.train(csbm, str(tmp_path / "csbm"))
    assert "family: checkpoint unconstrained, current constrained" in str(error.value)
    assert "--config.training.init_from" in str(error.value)
    empty = _smoke("qcsbm", **{"training.num_steps": 0, "training.init_from": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="init_from=.* holds no checkpoint"):
        train.train(empty, str(tmp_path / "qcsbm"))
