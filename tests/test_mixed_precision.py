"""training.compute_dtype='bfloat16': the network computes in bfloat16 while parameters,
optimiser state, EMA and the loss stay float32; 'float32' (the default) adds no cast."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qcsbm_jax import config as config_lib, experiment, losses, models, train
from qcsbm_jax.models.ncsnpp import NCSNpp

# The paper's NCSN++ options at 8 x 8 (FIR resampling, Fourier embedding, attention).
TINY_NCSNPP = dict(models.NCSNPP_DEEP, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), init_scale=1.0, dropout=0.0)
ONE_LEVEL = dict(TINY_NCSNPP, ch_mult=(1,), attn_resolutions=(8,))  # Cheaper to compile.
# Relative error of a bfloat16 network output against float32 on a fixed input: bfloat16
# keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation), which add up
# over the layers; measured 2.0% and 2.5% for the test networks below, 0.4% for the toy
# MLP and 0.7% for the small NCSN++ (fresh networks).
OUTPUT_RTOL = 5e-2


def _equations(closed_jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (jit, custom_jvp, ...) included."""
    stack = [closed_jaxpr.jaxpr]
    while stack:
        jaxpr = stack.pop()
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        stack.append(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        stack.append(sub)


def _operand_dtypes(closed_jaxpr, primitives):
    return {(e.primitive.name, str(v.aval.dtype)) for e in _equations(closed_jaxpr)
            if e.primitive.name in primitives for v in e.invars if hasattr(v.aval, "dtype")}


def _ncsnpp(options, compute_dtype):
    network = NCSNpp(image_size=8, channels=1, **options, rngs=nnx.Rngs(0))
    return models.functional(network, compute_dtype)


def _inputs(batch=2):
    x = jax.random.uniform(jax.random.key(1), (batch, 8, 8, 1))
    return x, jnp.linspace(0.05, 20.0, batch)


def test_network_runs_in_bfloat16_with_float32_embedding_norm_softmax_and_gradient_sums():
    """Forward and backward: every matmul and convolution (the fused FIR ones included) in
    bfloat16; the noise embedding (sin, cos), GroupNorm statistics, softmax (exp, max) and
    every sum, the parameter gradients' sums over batch and positions included, in
    float32."""
    apply_fn, params = _ncsnpp(TINY_NCSNPP, "bfloat16")
    x, sigma = _inputs()
    loss = lambda p: jnp.sum(jnp.square(apply_fn(p, x, sigma)))
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params)
    matmuls = _operand_dtypes(jaxpr, ("conv_general_dilated", "dot_general"))
    assert {dtype for _, dtype in matmuls} == {"bfloat16"}
    assert ("conv_general_dilated", "bfloat16") in matmuls
    float32_only = _operand_dtypes(jaxpr, ("sin", "cos", "exp", "reduce_sum", "reduce_max"))
    assert float32_only and {dtype for _, dtype in float32_only} == {"float32"}
    assert _leaf_dtypes(jaxpr.out_avals) == {"float32"}


def test_float32_adds_no_cast():
    """Off (the default): the program of before, without a cast between floating dtypes
    anywhere, forward or backward, so float32 training is bit-identical to before the
    option (the network's own casts, of booleans, are there either way)."""
    apply_fn, params = _ncsnpp(TINY_NCSNPP, "float32")
    x, sigma = _inputs()
    loss = lambda p: jnp.sum(jnp.square(apply_fn(p, x, sigma)))
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params)
    casts = [e for e in _equations(jaxpr) if e.primitive.name == "convert_element_type"]
    assert casts and {str(e.invars[0].aval.dtype) for e in casts} == {"bool"}


@pytest.mark.parametrize("options", [ONE_LEVEL, dict(ONE_LEVEL, embedding_type="positional")],
                         ids=["fourier", "positional"])
def test_bfloat16_output_agrees_with_float32_with_a_float32_embedding(options):
    x, sigma = _inputs(4)
    high, params = _ncsnpp(options, "float32")
    low, _ = _ncsnpp(options, "bfloat16")
    embedding = _operand_dtypes(jax.make_jaxpr(low)(params, x, sigma), ("sin", "cos"))
    assert embedding == {("sin", "float32"), ("cos", "float32")}
    reference, out = high(params, x, sigma), low(params, x, sigma)
    error = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
    assert out.dtype == jnp.float32 and 0 < error < OUTPUT_RTOL


@pytest.mark.parametrize("init,head", [("pytorch", "none"), ("flax", "elu"),
                                       ("pytorch", "leaky_relu")])
def test_toy_network_in_bfloat16(init, head):
    """Both initialisations and the head activations: the dense layers in bfloat16, the
    Swish slopes and the output float32, close to float32."""
    c = config_lib.toy_config("gaussians8", "usbm", "smoke")
    c.model.update(init=init, head_activation=head)
    network = models.build_model(c.model, (2,), jax.random.key(0))
    (high, params), (low, _) = (models.functional(network, d) for d in ("float32", "bfloat16"))
    x = jax.random.normal(jax.random.key(1), (64, 2))
    sigma = jnp.linspace(0.1, 3.0, 64)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(jnp.square(low(p, x, sigma)))))(params)
    assert _operand_dtypes(jaxpr, ("dot_general",)) == {("dot_general", "bfloat16")}
    assert _operand_dtypes(jaxpr, ("logistic",)) == {("logistic", "float32")}
    reference, out = high(params, x, sigma), low(params, x, sigma)
    error = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
    assert out.dtype == jnp.float32 and 0 < error < OUTPUT_RTOL


@functools.cache
def _toy(compute_dtype):
    c = config_lib.toy_config("gaussians8", "qcsbm", "smoke")
    c.training.compute_dtype = compute_dtype
    c.loss.estimator = "nonneg"  # Hutchinson: the products the image models use.
    config_lib.validate(c)
    return c, experiment.build_score_model(c, c.training.compute_dtype)


def _loss_fn(compute_dtype):
    c, model = _toy(compute_dtype)
    return losses.make_loss_fn(model.score_fn, model.sde, **c.loss)


def _leaf_dtypes(tree):
    return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


def test_only_kernels_are_cast():
    """Biases, GroupNorm scales and the Fourier frequencies reach the layers in float32."""
    apply_fn, params = _ncsnpp(TINY_NCSNPP, "bfloat16")
    x, sigma = _inputs()
    seen = {}

    def spy(p, *args):
        seen.update(jax.tree_util.tree_leaves_with_path(p))
        return jnp.zeros_like(args[0])

    models.mixed_precision(spy, jnp.bfloat16)(params, x, sigma)
    for path, leaf in seen.items():
        kernel = jax.tree_util.keystr(path).endswith("['kernel']")
        assert str(leaf.dtype) == ("bfloat16" if kernel else "float32"), path
    names = {jax.tree_util.keystr(path) for path in seen}
    assert any(name.endswith("['frequencies']") for name in names)


def test_bfloat16_train_step_keeps_float32_masters_optimizer_state_and_ema():
    c, model = _toy("bfloat16")
    optimizer = train.make_optimizer(c.optim)
    state = train.init_state(jax.tree.map(jnp.asarray, model.init_params), optimizer, 0)
    ema_decay = 0.9  # The toy's is 0; the EMA must be recomputed in the step.
    step = jax.jit(train.make_train_step(_loss_fn("bfloat16"), optimizer, ema_decay))
    new, metrics = step(state, jax.random.normal(jax.random.key(2), (64, 2)))
    assert int(new.step) == 1 and float(metrics["nonfinite"]) == 0
    for tree in (new.params, new.ema_params, new.opt_state):
        assert _leaf_dtypes(tree) == {"float32"}
    assert {str(v.dtype) for v in metrics.values()} == {"float32"}
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
    assert all(jax.tree.leaves(moved))


def test_loss_and_its_gradient_are_reduced_in_float32_around_a_bfloat16_network():
    x0 = jax.random.normal(jax.random.key(3), (32, 2))
    value_and_grad = jax.value_and_grad(_loss_fn("bfloat16"), has_aux=True)
    jaxpr = jax.make_jaxpr(value_and_grad)(_toy("bfloat16")[1].init_params, x0,
                                           jax.random.key(4))
    assert _operand_dtypes(jaxpr, ("dot_general",)) == {("dot_general", "bfloat16")}
    assert _operand_dtypes(jaxpr, ("reduce_sum",)) == {("reduce_sum", "float32")}
    assert _leaf_dtypes(jaxpr.out_avals) == {"float32"}


def test_bfloat16_loss_and_gradient_agree_with_float32():
    params = _toy("float32")[1].init_params
    x0 = jax.random.normal(jax.random.key(3), (256, 2))
    key = jax.random.key(5)
    results = {}
    for dtype in ("float32", "bfloat16"):
        (loss, metrics), grads = jax.jit(jax.value_and_grad(_loss_fn(dtype), has_aux=True))(
            params, x0, key)
        flat = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)])
        results[dtype] = (metrics["dsm"], metrics["qc"], flat)
    for high, low in zip(results["float32"], results["bfloat16"]):
        error = float(jnp.linalg.norm(low - high) / jnp.linalg.norm(high))
        assert 0 < error < OUTPUT_RTOL


def test_bad_compute_dtype_is_one_clear_error():
    c = config_lib.toy_config("gaussians8", "usbm", "smoke")
    c.training.compute_dtype = "float16"
    with pytest.raises(ValueError, match=r"training.compute_dtype='float16'.*'bfloat16'"):
        config_lib.validate(c)
    network = models.build_model(c.model, (2,), jax.random.key(0))
    with pytest.raises(ValueError, match=r"training.compute_dtype\) must be one of"):
        models.functional(network, "float16")


def test_train_uses_training_compute_dtype(tmp_path, monkeypatch):
    """train.train builds its network with training.compute_dtype and trains it with
    float32 parameters, optimiser state and EMA."""
    built = []
    build = experiment.build_score_model
    monkeypatch.setattr(experiment, "build_score_model",
                        lambda config, dtype="float32": built.append(dtype) or build(config, dtype))
    c = config_lib.toy_config("gaussians8", "usbm", "smoke")
    c.training.update(num_steps=2, checkpoint_every=2, log_every=1, compute_dtype="bfloat16")
    c.model.widths = (32, 32)
    c.optim.ema_decay = 0.5
    final = train.train(c, str(tmp_path))
    assert built == ["bfloat16"] and int(final.step) == 2
    assert _leaf_dtypes((final.params, final.ema_params, final.opt_state)) == {"float32"}
    initial = build(c).init_params
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), final.params, initial)
    assert all(jax.tree.leaves(moved))
