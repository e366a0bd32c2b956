"""NCSN++ / DDPM++: shapes for every option, the untrained Fourier frequencies, dropout,
per-sample independence, the constrained (energy) parameterisation, presets and config
wiring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qcsbm_jax import models, score
from qcsbm_jax.models.ncsnpp import NCSNpp
from qcsbm_jax.sde import VESDE

# The paper's NCSN++ options at a toy size (8x8 images, two resolutions, attention at 4x4).
# init_scale 1 so that every residual branch, and hence dropout, visibly changes the output.
SMALL = dict(models.NCSNPP_DEEP, nf=8, ch_mult=(1, 2), num_res_blocks=1,
             attn_resolutions=(4,), init_scale=1.0)

VARIANTS = {
    "ncsnpp": {},
    "input_skip_output_skip": dict(progressive_input="input_skip", progressive="output_skip"),
    "nearest_residual_paths_positional": dict(
        fir=False, progressive_input="residual", progressive="residual",
        embedding_type="positional", skip_rescale=False, center_input=False),
    "ddpm_fir_input_skip_cat": dict(resblock_type="ddpm", progressive_input="input_skip",
                                    progressive_combine="cat"),
    "ddpm_pool_output_skip": dict(resblock_type="ddpm", fir=False, resamp_with_conv=False,
                                  progressive_input="none", progressive="output_skip"),
    "ddpm_fir_no_conv_residual": dict(resblock_type="ddpm", resamp_with_conv=False,
                                      progressive="residual", attn_resolutions=(8, 4)),
    "ddpmpp": dict(models.DDPMPP_DEEP, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), init_scale=1.0),
}


def build(channels=1, seed=0, **overrides):
    return NCSNpp(image_size=8, channels=channels, **dict(SMALL, **overrides),
                  rngs=nnx.Rngs(seed))


@functools.cache
def micro_model():
    """A one-resolution NCSN++ (8x8x1, attention at 8) and its (jitted apply_fn, params),
    built once. Compile time grows with depth, and the tests below that differentiate
    it twice or draw dropout masks only need every kind of block once. A two-resolution
    network runs in test_init_scale_zero_makes_residual_and_output_layers_small, and the
    resampling layers are double-differentiated in test_layers."""
    model = build(ch_mult=(1,), attn_resolutions=(8,))
    apply_fn, params = models.functional(model)
    return model, jax.jit(apply_fn), params


def inputs(batch=2, channels=1, seed=1):
    x = jax.random.uniform(jax.random.key(seed), (batch, 8, 8, channels))
    return x, jnp.linspace(0.05, 20.0, batch)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_output_shape_and_dtype_for_every_option(name):
    x, sigma = inputs(channels=3)
    out = jax.eval_shape(lambda: build(channels=3, **VARIANTS[name])(x, sigma, jax.random.key(0)))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_fourier_frequencies_are_checkpointed_parameters_that_never_train():
    """They are in params (so every restore path carries them, and an imported model keeps
    its own), drawn from a fixed key whatever the seed, used by the network, and exactly
    unchanged by gradients, clipping and Adam."""
    _, apply_fn, params = micro_model()
    frequencies = np.asarray(params["fourier"]["frequencies"])
    assert frequencies.shape == (SMALL["nf"],) and 2.0 < np.abs(frequencies).max() < 100.0
    other = build(ch_mult=(1,), attn_resolutions=(8,), seed=1)
    _, other_params = models.functional(other)
    assert not np.array_equal(other_params["conv_in"]["kernel"], params["conv_in"]["kernel"])
    np.testing.assert_array_equal(other_params["fourier"]["frequencies"], frequencies)

    x, sigma = inputs()
    optimizer = optax.chain(optax.clip_by_global_norm(1e-3), optax.adam(1e-2))

    @jax.jit
    def step(p):
        grads = jax.grad(lambda q: jnp.mean(jnp.square(apply_fn(q, x, sigma, None))))(p)
        updates, _ = optimizer.update(grads, optimizer.init(p), p)
        return optax.apply_updates(p, updates), grads

    new_params, grads = step(params)
    assert not np.any(grads["fourier"]["frequencies"])
    assert float(jnp.abs(grads["temb_in"]["kernel"]).max()) > 0
    np.testing.assert_array_equal(new_params["fourier"]["frequencies"], frequencies)
    assert not np.allclose(apply_fn(new_params, x, sigma, None), apply_fn(params, x, sigma, None))
    moved = jax.tree.map(lambda a: a, params)
    moved["fourier"] = {"frequencies": frequencies + 1.0}
    assert not np.allclose(apply_fn(moved, x, sigma, None), apply_fn(params, x, sigma, None))


def test_dropout_is_a_deterministic_function_of_the_key():
    _, apply_fn, params = micro_model()
    x, sigma = inputs()
    a = apply_fn(params, x, sigma, jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(a, apply_fn(params, x, sigma, jax.random.key(0)))
    assert not np.allclose(a, apply_fn(params, x, sigma, jax.random.key(1)))
    plain = apply_fn(params, x, sigma, None)
    np.testing.assert_array_equal(plain, apply_fn(params, x, sigma, None))
    assert not np.allclose(a, plain)


def test_jacobian_is_block_diagonal_over_samples():
    """Sample i's output does not depend on sample j's input (no batch statistics)."""
    _, apply_fn, params = micro_model()
    x, sigma = inputs()
    jac = jax.jit(jax.jacfwd(lambda y: apply_fn(params, y, sigma, None)))(x)
    jac = np.asarray(jac).reshape(2, 64, 2, 64)
    np.testing.assert_array_equal(jac[0, :, 1], 0.0)
    np.testing.assert_array_equal(jac[1, :, 0], 0.0)
    assert np.abs(jac[0, :, 0]).max() > 1e-3 and np.abs(jac[1, :, 1]).max() > 1e-3


def test_constrained_score_is_minus_energy_gradient_and_double_backprop_is_finite():
    _, apply_fn, params = micro_model()
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    score_fn = score.make_score_fn(apply_fn, sde, "constrained", "scaled")
    energy_fn = score.make_energy_fn(apply_fn, sde, "scaled")
    x, _ = inputs()
    t, key = jnp.array([0.2, 0.7]), None  # dropout is exercised (and costly) elsewhere
    v = jax.random.normal(jax.random.key(5), x.shape)

    def dsm(p):
        std = sde.std(t)[:, None, None, None]
        return jnp.mean(jnp.square(std * score_fn(p, x + std * v, t, key) + v))

    @jax.jit  # one compiled program: score, forward-mode derivative of E, double backprop
    def check(p):
        _, directional = jax.jvp(lambda y: energy_fn(p, y, t, key), (x,), (v,))
        return score_fn(p, x, t, key), directional, jax.grad(dsm)(p)

    s, directional, grads = check(params)
    np.testing.assert_allclose(-jnp.sum(s * v, axis=(1, 2, 3)), directional, rtol=1e-4)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert max(float(jnp.abs(g).max()) for g in leaves) > 0


def test_init_scale_zero_makes_residual_and_output_layers_small():
    # Two resolutions of equal width reuse the micro model's initialiser compilations.
    model = build(init_scale=0.0, ch_mult=(1, 1), progressive="output_skip",
                  progressive_input="input_skip")
    x, sigma = inputs()
    out = nnx.jit(lambda m, y, c: m(y, c))(model, x, sigma)
    assert bool(jnp.all(jnp.isfinite(out))) and 0 < float(jnp.abs(out).max()) < 1e-3
    small = [model.mid_block1.conv_out, model.mid_attention.out,
             *(level.pyramid.conv for level in model.up_levels),
             *(block.conv_out for level in model.down_levels for block in level.blocks)]
    for layer in small:
        assert float(jnp.abs(layer.kernel[...]).max()) < 1e-4
    assert float(jnp.abs(model.conv_in.kernel[...]).max()) > 1e-2
    assert model.head is None  # output_skip: the pyramid is the output


def count_params(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def expected_num_params(image_size, channels, nf, ch_mult, num_res_blocks,
                        attn_resolutions, embedding_type, progressive_input, **_):
    """Parameter count of score_sde's NCSN++ with BigGAN blocks, FIR or plain resampling
    convs, progressive input 'residual', 'input_skip' (combined by 'sum') or 'none' and no
    progressive output."""
    conv = lambda k, i, o: k * k * i * o + o  # noqa: E731
    dense = lambda i, o: i * o + o  # noqa: E731
    attention = lambda c: 2 * c + 4 * dense(c, c)  # noqa: E731

    def resblock(i, o, resample=False):
        shortcut = conv(1, i, o) if i != o or resample else 0
        return 2 * i + conv(3, i, o) + dense(4 * nf, o) + 2 * o + conv(3, o, o) + shortcut

    fourier = embedding_type == "fourier"  # nf frequencies (a never-trained parameter)
    total = (nf if fourier else 0) + dense(2 * nf if fourier else nf, 4 * nf)
    total += dense(4 * nf, 4 * nf) + conv(3, channels, nf)
    skips, c, pyramid = [nf], nf, channels
    for level, mult in enumerate(ch_mult):
        attend = (image_size >> level) in attn_resolutions
        for _ in range(num_res_blocks):
            total += resblock(c, nf * mult) + (attention(nf * mult) if attend else 0)
            c = nf * mult
            skips.append(c)
        if level < len(ch_mult) - 1:
            total += resblock(c, c, resample=True)
            if progressive_input == "residual":
                total += conv(3, pyramid, c)
                pyramid = c
            elif progressive_input == "input_skip":  # a 1x1 conv of the downsampled image
                total += dense(channels, c)
            skips.append(c)
    total += 2 * resblock(c, c) + attention(c)
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += resblock(c + skips.pop(), nf * ch_mult[level])
            c = nf * ch_mult[level]
        total += attention(c) if (image_size >> level) in attn_resolutions else 0
        total += resblock(c, c, resample=True) if level > 0 else 0
    return total + 2 * c + conv(3, c, channels)


@pytest.mark.parametrize("preset", ["NCSNPP_DEEP", "DDPMPP_DEEP"])
def test_parameter_count_matches_independent_count(preset):
    config = dict(getattr(models, preset), nf=16, num_res_blocks=1)  # same structure, small
    params = jax.eval_shape(lambda: nnx.state(
        NCSNpp(image_size=32, channels=3, **config, rngs=nnx.Rngs(0)), nnx.Param))
    assert count_params(params) == expected_num_params(32, 3, **config)


def test_deep_preset_parameter_counts():
    """score_sde reports about 108M parameters for NCSN++ cont. (deep) on CIFAR-10 with
    progressive input 'residual' (the official PyTorch model's parameters() count
    107,587,075, 128 of them the untrained Fourier frequencies); 'input_skip' (the
    preset's, as the paper states it) has fewer."""
    ncsnpp = expected_num_params(32, 3, **models.NCSNPP_DEEP)
    ddpmpp = expected_num_params(32, 3, **models.DDPMPP_DEEP)
    print(f"NCSN++ deep: {ncsnpp:,} parameters; DDPM++ deep: {ddpmpp:,}")
    assert ncsnpp == 106_700_803 and ddpmpp == 106_632_579
    residual = dict(models.NCSNPP_DEEP, progressive_input="residual")
    assert expected_num_params(32, 3, **residual) == 107_587_075


def _config(name, **model):
    """A config's model section, as a plain dict."""
    return dict(name=name, family="unconstrained", output="scaled", **model)


@pytest.mark.parametrize("name,preset", [("ncsnpp", models.NCSNPP_DEEP),
                                         ("ddpmpp", models.DDPMPP_DEEP)])
def test_build_model_from_config(name, preset):
    model = nnx.eval_shape(lambda: models.build_model(
        _config(name, **dict(preset, nf=16, ch_mult=(1, 2), num_res_blocks=1)), (16, 16, 3),
        jax.random.key(0)))
    assert isinstance(model, NCSNpp)
    assert (model.image_size, model.channels, model.nf) == (16, 3, 16)
    assert model.embedding_type == preset["embedding_type"]


def test_build_model_errors_name_what_to_fix():
    good = dict(models.NCSNPP_DEEP, nf=16, ch_mult=(1, 2), num_res_blocks=1)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="missing keys \\['dropout'\\]"):
        models.build_model(_config("ncsnpp", **{k: v for k, v in good.items()
                                                 if k != "dropout"}), (16, 16, 3), key)
    with pytest.raises(ValueError, match="unknown keys \\['num_res_block'\\]"):
        models.build_model(_config("ncsnpp", num_res_block=2, **good), (16, 16, 3), key)
    with pytest.raises(ValueError, match="square images"):
        models.build_model(_config("ncsnpp", **good), (16, 8, 3), key)
    with pytest.raises(ValueError, match="divisible"):
        models.build_model(_config("ncsnpp", **dict(good, ch_mult=(1, 2, 2, 2, 2, 2))),
                           (16, 16, 3), key)
    with pytest.raises(ValueError, match="attn_resolutions"):
        models.build_model(_config("ncsnpp", **dict(good, attn_resolutions=(5,))),
                           (16, 16, 3), key)
    with pytest.raises(ValueError, match="progressive_input"):
        models.build_model(_config("ncsnpp", **dict(good, progressive_input="skip")),
                           (16, 16, 3), key)


def test_call_rejects_wrong_shapes():
    model, _, _ = micro_model()
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((2, 1, 8, 8)), jnp.ones((2,)))
    with pytest.raises(ValueError, match="noise_condition"):
        model(jnp.zeros((2, 8, 8, 1)), jnp.ones(()))
