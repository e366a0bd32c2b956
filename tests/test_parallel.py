"""FSDP shardings and device-count independence of the train step, the samplers, the
likelihood and the asymmetry evaluation (1 vs 8 devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qcsbm_jax import asymmetry, experiment, likelihood, parallel, sampling, train
from test_train import _batch, _smoke, _step_fn


def _meshes():
    """One device, and eight: four on the data axis x two on the model axis, so the batch
    is split eight ways and parameters and optimizer state two ways (FSDP)."""
    devices = jax.devices()[:8]
    return {"1": parallel.make_mesh(devices=devices[:1]),
            "4x2": parallel.make_mesh(4, 2, devices=devices)}


@pytest.mark.parametrize("shape, model_size, spec", [
    ((32, 64), 2, P(None, "model")),
    ((64, 32), 2, P("model", None)),
    ((6, 6), 2, P("model", None)),
    ((3, 5), 2, P()),
    ((), 2, P()),
    ((64, 32), 1, P()),
])
def test_fsdp_spec_shards_the_largest_divisible_dimension(shape, model_size, spec):
    assert parallel.fsdp_spec(shape, model_size) == spec


def test_train_step_same_on_1_and_8_devices():
    config = _smoke("qcsbm", **{"loss.estimator": "nonneg"})
    model = experiment.build_score_model(config)
    optimizer, step_fn = _step_fn(config, model)
    results = {}
    for name, mesh in _meshes().items():
        init = lambda p: train.init_state(p, optimizer, 0)
        sharding = parallel.state_sharding(mesh, jax.eval_shape(init, model.init_params))
        state = jax.jit(init, out_shardings=sharding)(model.init_params)
        step = jax.jit(step_fn, in_shardings=(sharding, parallel.data_sharding(mesh)),
                       out_shardings=(sharding, parallel.replicated(mesh)))
        for i in range(3):
            state, metrics = step(state, parallel.global_batch(_batch(config, i), mesh))
        results[name] = (state, float(metrics["loss"]))
    # Parameters and Adam moments stay split in two along their largest even dimension.
    fsdp = results["4x2"][0]
    sharded = 0
    for leaf in jax.tree.leaves((fsdp.params, fsdp.opt_state)):
        halves = parallel.fsdp_spec(leaf.shape, 2) != P()
        assert leaf.addressable_shards[0].data.size * (2 if halves else 1) == leaf.size
        sharded += halves
    assert sharded == 3 * 7  # 7 of the 16 parameter arrays have an even dimension; x3 for Adam.
    np.testing.assert_allclose(results["4x2"][1], results["1"][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results["4x2"][0].params),
                    jax.tree.leaves(results["1"][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def toy_model():
    config = _smoke("usbm")
    return experiment.build_score_model(config)


def _sharded(fn, mesh, params, arrays, batch_size=8):
    """fn(params, *batches) run per shard over host arrays with map_batches."""
    jitted = jax.jit(parallel.per_shard(fn, mesh, num_replicated=1, num_batched=len(arrays)))
    params = jax.device_put(params, parallel.state_sharding(mesh, params))
    return parallel.map_batches(lambda *b: jitted(params, *b), arrays, batch_size, mesh)


def _same_on_1_and_8_devices(fn, params, arrays, rtol=1e-5):
    """fn's results on one device and on 4 x 2 (FSDP parameters gathered for fn); ODE
    solves differ by float32 round-off only."""
    one, eight = (_sharded(fn, _meshes()[name], params, arrays) for name in ("1", "4x2"))
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
        if np.issubdtype(a.dtype, np.integer):
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6)
    return one


def test_ode_sampler_same_on_1_and_8_devices(toy_model):
    prior = np.asarray(toy_model.sde.prior_sample(jax.random.key(0), (20, 2)))

    def sample(params, z):
        return sampling.ode_sample_from_prior(params, z, score_fn=toy_model.score_fn,
                                              sde=toy_model.sde, rtol=1e-3, atol=1e-3)

    samples, nfe = _same_on_1_and_8_devices(sample, toy_model.init_params, (prior,), rtol=1e-4)
    assert samples.shape == (20, 2) and np.all(np.isfinite(samples)) and np.all(nfe > 0)


def test_pc_sampler_same_on_1_and_8_devices(toy_model):
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(1), 20)))

    def sample(params, key_data):
        return sampling.pc_sample_per_key(
            params, jax.random.wrap_key_data(key_data), score_fn=toy_model.score_fn,
            sde=toy_model.sde, shape=(2,), num_steps=10)

    samples = _same_on_1_and_8_devices(sample, toy_model.init_params, (keys,), rtol=1e-4)
    assert samples.shape == (20, 2) and np.all(np.isfinite(samples))


def test_likelihood_same_on_1_and_8_devices(toy_model):
    x = np.asarray(jax.random.normal(jax.random.key(2), (20, 2))) * 3

    def nll(params, batch):
        value, _, nfe = likelihood.ode_log_likelihood(
            params, batch, score_fn=toy_model.score_fn, sde=toy_model.sde, rtol=1e-3,
            atol=1e-3)
        return value, nfe

    values, nfe = _same_on_1_and_8_devices(nll, toy_model.init_params, (x,), rtol=1e-4)
    assert np.all(np.isfinite(values)) and np.all(nfe > 0)


def test_exact_asymmetry_same_on_1_and_8_devices(toy_model):
    x = np.asarray(jax.random.normal(jax.random.key(3), (20, 2))) * 3
    t = np.linspace(0.1, 0.9, 20, dtype=np.float32)

    def metrics(params, batch, times):
        jac = asymmetry.full_jacobian(lambda y: toy_model.score_fn(params, y, times), batch)
        return asymmetry.asymmetry(jac), asymmetry.normalized_asymmetry(jac)

    asym, nasym = _same_on_1_and_8_devices(metrics, toy_model.init_params, (x, t))
    assert np.all(asym > 0) and np.all((nasym >= 0) & (nasym <= 1))


def test_batch_size_must_split_over_every_device():
    parallel.check_batch_size(16, _meshes()["4x2"])
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        parallel.check_batch_size(12, _meshes()["4x2"])
