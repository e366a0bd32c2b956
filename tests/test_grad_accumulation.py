"""training.grad_accum_steps = k: the update of the whole batch, computed in k micro-batches."""

import jax
import numpy as np
import pytest

from qcsbm_jax import config as config_lib, experiment, losses, parallel, train
from qcsbm_jax.data import toy

BATCH = 64


def _setup(**loss_options):
    config = config_lib.toy_config("gaussians8", "qcsbm", "smoke")
    with config.unlocked():
        config.model.widths = (32, 32)
        config.training.batch_size = BATCH
    model = experiment.build_score_model(config)
    options = {**config.loss, "estimator": "nonneg", "num_probes": 2, **loss_options}
    loss = losses.make_loss_fn(model.score_fn, model.sde, **options)
    data = toy.sample_toy("gaussians8", jax.random.key(0), 1024)
    batch = lambda step: toy.toy_batch(data, jax.random.key(1), step, BATCH)
    return config, model, loss, batch


def _close(a, b, rtol):
    """Every leaf equal up to rtol of the leaf's largest entry (float32 sums in other order)."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=rtol, atol=rtol * float(np.max(np.abs(y)))), a, b)


def test_micro_batches_give_the_whole_batch_gradient():
    """The penalty with two probes per sample: the micro-batches use the batch's probes."""
    _, model, loss, batch = _setup()
    key = jax.random.key(3)
    gradients = jax.jit(train.loss_gradients, static_argnums=0,
                        static_argnames="grad_accum_steps")
    whole = gradients(loss, model.init_params, batch(0), key)
    _close(gradients(loss, model.init_params, batch(0), key, grad_accum_steps=4), whole, 1e-5)
    # Other draws give another gradient: the comparison can fail.
    other = gradients(loss, model.init_params, batch(0), jax.random.key(4))
    assert not np.allclose(other[1]["head"]["kernel"], whole[1]["head"]["kernel"], rtol=1e-2)


def test_accumulated_steps_follow_large_batch_steps_with_clipping():
    config, model, loss, batch = _setup()
    optimizer = train.make_optimizer(config.optim)
    states, norms = {}, {}
    for k in (1, 4):
        step = jax.jit(train.make_train_step(loss, optimizer, 0.0, grad_accum_steps=k))
        state, norms[k] = train.init_state(model.init_params, optimizer, 0), []
        for n in range(3):
            state, metrics = step(state, batch(n))
            norms[k].append(float(metrics["grad_norm"]))
        states[k] = state
    assert min(norms[1]) > config.optim.grad_clip  # Every step was clipped.
    np.testing.assert_allclose(norms[4], norms[1], rtol=1e-5)
    _close(states[4].params, states[1].params, 1e-5)


def test_training_with_accumulation_matches(tmp_path):
    """train() with grad_accum_steps=2 on the 8-device mesh equals grad_accum_steps=1."""
    finals = {}
    for k in (1, 2):
        config, *_ = _setup()
        with config.unlocked():
            config.training.update(num_steps=1, log_every=1, checkpoint_every=1,
                                   grad_accum_steps=k)
        finals[k] = train.train(config, str(tmp_path / f"k{k}"))
    _close(finals[2].params, finals[1].params, 1e-5)


@pytest.mark.parametrize("steps", [3, 0, 2.0])
def test_bad_accumulation_is_refused(steps):
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train._check_accumulation(BATCH, steps, parallel.make_mesh())


def test_micro_batches_must_split_over_the_devices():
    with pytest.raises(ValueError, match="micro-batch size"):
        train._check_accumulation(BATCH, 16, parallel.make_mesh())  # 4 rows, 8 devices
