"""Building blocks of NCSN++ against naive NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qcsbm_jax.models import layers

FIR = (1, 3, 3, 1)


def naive_upfirdn2d(x, kernel, up, down, pad):
    """Zero-insertion, zero padding (negative crops), a true 2D convolution, decimation."""
    b, h, w, c = x.shape
    u = np.zeros((b, h * up, w * up, c))
    u[:, ::up, ::up] = x
    p0, p1 = pad
    u = np.pad(u, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    u = u[:, max(-p0, 0):u.shape[1] - max(-p1, 0), max(-p0, 0):u.shape[2] - max(-p1, 0)]
    kh, kw = kernel.shape
    out = np.zeros((b, u.shape[1] - kh + 1, u.shape[2] - kw + 1, c))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            for a in range(kh):
                for d in range(kw):  # convolution: output[i] = sum_a k[a] u[i + kh - 1 - a]
                    out[:, i, j] += kernel[a, d] * u[:, i + kh - 1 - a, j + kw - 1 - d]
    return out[:, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (0, 0)), (2, 1, (2, 1)), (1, 2, (1, 1)),
                                         (2, 2, (1, 2)), (1, 1, (-1, 2))])
def test_upfirdn2d_matches_naive_reference(up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3))
    kernel = rng.normal(size=(3, 4))  # asymmetric, so a flip or transpose would show
    got = layers.upfirdn2d(jnp.asarray(x, jnp.float32), kernel, up=up, down=down, pad=pad)
    np.testing.assert_allclose(got, naive_upfirdn2d(x, kernel, up, down, pad), atol=1e-5)


@pytest.mark.parametrize("up,down,pad", [(1, 1, (0, 0)), (2, 1, (2, 1)), (1, 2, (1, 1)),
                                         (2, 2, (1, 2)), (1, 1, (-1, 2))])
def test_separable_upfirdn2d_matches_naive_reference_of_the_outer_kernel(up, down, pad):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 6, 3))
    taps = rng.normal(size=4)  # Asymmetric, so a flip would show.
    got = layers.upfirdn2d(jnp.asarray(x, jnp.float32), taps, up=up, down=down, pad=pad)
    want = naive_upfirdn2d(x, np.outer(taps, taps), up, down, pad)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fir_resampling_shapes_and_constant_interior():
    x = jnp.full((1, 8, 8, 2), 3.0)
    down = layers.fir_downsample(x, FIR)
    up = layers.fir_upsample(x, FIR)
    assert down.shape == (1, 4, 4, 2) and up.shape == (1, 16, 16, 2)
    # Zero padding (as in score_sde) only touches the outermost row / column.
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
    # The border of the downsampled image sees one zero tap of [1, 3, 3, 1] / 8.
    np.testing.assert_allclose(down[0, 0, 1:-1, 0], 3.0 * 7 / 8, rtol=1e-6)


def test_fir_resampling_equals_naive_with_score_sde_padding():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 4, 1))
    k = np.outer(FIR, FIR) / 64.0
    np.testing.assert_allclose(layers.fir_downsample(jnp.asarray(x, jnp.float32), FIR),
                               naive_upfirdn2d(x, k, 1, 2, (1, 1)), atol=1e-5)
    np.testing.assert_allclose(layers.fir_upsample(jnp.asarray(x, jnp.float32), FIR),
                               naive_upfirdn2d(x, 4 * k, 2, 1, (2, 1)), atol=1e-5)


def test_fused_resampling_convs_reduce_to_fir_resampling_for_a_point_kernel():
    """With weights = delta (centre tap) x M, the fused convs are FIR resampling then M."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    mix = rng.normal(size=(3, 5))
    weights = np.zeros((3, 3, 3, 5))
    weights[1, 1] = mix
    weights = jnp.asarray(weights, jnp.float32)
    up = layers.fir_upsample_conv(x, weights, FIR)
    down = layers.fir_downsample_conv(x, weights, FIR)
    assert up.shape == (2, 16, 16, 5) and down.shape == (2, 4, 4, 5)
    np.testing.assert_allclose(up, layers.fir_upsample(x, FIR) @ mix, atol=1e-5)
    np.testing.assert_allclose(down, layers.fir_downsample(x, FIR) @ mix, atol=1e-5)


def test_second_derivatives_through_fir_resampling_match_finite_differences():
    """d/dw ||grad_x E(x, w)||^2 (double backprop, as for the constrained score) through
    the fused FIR convolutions, against central differences along a random direction."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 4, 4, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 3, 3, 2, 2)) / 3, jnp.float32)
    direction = jnp.asarray(rng.normal(size=w.shape), jnp.float32)

    def energy(y, weights):
        h = jnp.tanh(layers.fir_upsample_conv(y, weights[0], FIR))
        return jnp.sum(jnp.tanh(layers.fir_downsample_conv(layers.fir_downsample(h, FIR),
                                                           weights[1], FIR)) ** 2)

    def grad_norm(weights):
        return jnp.sum(jax.grad(energy)(x, weights) ** 2)

    analytic = jnp.sum(jax.grad(grad_norm)(w) * direction)
    eps = 1e-2
    numeric = (grad_norm(w + eps * direction) - grad_norm(w - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_nearest_and_mean_resampling():
    x = np.arange(32.0).reshape(1, 4, 4, 2)
    np.testing.assert_array_equal(layers.nearest_upsample(jnp.asarray(x))[0, :, :, 1],
                                  np.kron(x[0, :, :, 1], np.ones((2, 2))))
    expected = x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(layers.mean_downsample(jnp.asarray(x)), expected)


@pytest.mark.parametrize("cls,fir,with_conv,size", [
    (layers.Upsample, True, True, 8), (layers.Upsample, True, False, 8),
    (layers.Upsample, False, True, 8), (layers.Downsample, True, True, 2),
    (layers.Downsample, False, True, 2), (layers.Downsample, False, False, 2)])
def test_resampling_modules_shapes(cls, fir, with_conv, size):
    out_ch = 6 if with_conv else 4
    module = cls(4, out_ch, with_conv=with_conv, fir=fir, fir_kernel=FIR, rngs=nnx.Rngs(0))
    assert module(jnp.ones((2, 4, 4, 4))).shape == (2, size, size, out_ch)


def test_resampling_without_conv_cannot_change_channels():
    with pytest.raises(ValueError, match="keeps the channels"):
        layers.Downsample(4, 8, with_conv=False, fir=True, fir_kernel=FIR, rngs=nnx.Rngs(0))


def test_sinusoidal_embedding_closed_form():
    c = jnp.array([0.0, 3.0, 500.0])
    got = layers.sinusoidal_embedding(c, 8)
    freqs = 10_000.0 ** (-np.arange(4) / 3)
    angles = np.asarray(c)[:, None] * freqs
    np.testing.assert_allclose(got, np.concatenate([np.sin(angles), np.cos(angles)], 1),
                               atol=1e-4)
    with pytest.raises(ValueError, match="even size"):
        layers.sinusoidal_embedding(c, 7)


def test_gaussian_fourier_embedding_uses_its_fixed_frequencies():
    emb = layers.GaussianFourierEmbedding(5, 16.0)
    w = np.asarray(emb.frequencies[...])
    assert isinstance(emb.frequencies, nnx.Param)  # checkpointed; see test_ncsnpp
    assert 2.0 < np.abs(w).max() < 100.0  # drawn with scale 16
    c = jnp.array([-1.0, 0.5])
    angles = 2 * math.pi * np.asarray(c)[:, None] * w
    np.testing.assert_allclose(emb(c), np.concatenate([np.sin(angles), np.cos(angles)], 1),
                               atol=1e-4)


def test_dropout_masks():
    x = jnp.ones((4, 8, 8, 16))
    assert layers.dropout(x, 0.5, None) is x
    assert layers.dropout(x, 0.0, jax.random.key(0)) is x
    a = layers.dropout(x, 0.25, jax.random.key(0))
    np.testing.assert_array_equal(a, layers.dropout(x, 0.25, jax.random.key(0)))
    assert not np.array_equal(a, layers.dropout(x, 0.25, jax.random.key(1)))
    np.testing.assert_allclose(np.unique(np.asarray(a)), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(float(jnp.mean(a == 0)) - 0.25) < 0.05


def test_group_norm_groups_and_bad_channels():
    assert layers.group_norm(256, rngs=nnx.Rngs(0)).num_groups == 32
    assert layers.group_norm(8, rngs=nnx.Rngs(0)).num_groups == 2
    with pytest.raises(ValueError, match="model.nf"):
        layers.group_norm(14, rngs=nnx.Rngs(0))


def test_default_init_variance_and_zero_scale():
    key = jax.random.key(0)
    w = layers.default_init(2.0)(key, (3, 3, 64, 32))
    fan_avg = 9 * (64 + 32) / 2
    np.testing.assert_allclose(np.var(np.asarray(w)), 2.0 / fan_avg, rtol=0.05)
    tiny = layers.default_init(0.0)(key, (3, 3, 64, 32))
    assert 0 < float(jnp.abs(tiny).max()) < 1e-4


def test_attention_block_matches_naive_attention():
    block = layers.AttentionBlock(8, skip_rescale=True, init_scale=1.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 8))
    h = np.asarray(block.norm(x)).reshape(2, 9, 8)

    def linear(layer, v):
        return v @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

    q, k, v = linear(block.query, h), linear(block.key, h), linear(block.value, h)
    logits = np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = linear(block.out, np.einsum("bqk,bkc->bqc", weights, v)).reshape(x.shape)
    np.testing.assert_allclose(block(x), (np.asarray(x) + attended) / np.sqrt(2), atol=1e-5)


@pytest.mark.parametrize("resample,fir,size", [(None, False, 4), ("up", True, 8),
                                               ("down", True, 2), ("up", False, 8),
                                               ("down", False, 2)])
def test_resnet_block_shapes_and_output_init(resample, fir, size):
    block = layers.ResnetBlock(8, 16, 12, dropout_rate=0.1, dropout_index=0,
                               skip_rescale=True, init_scale=0.0, resample=resample, fir=fir,
                               fir_kernel=FIR, rngs=nnx.Rngs(0))
    out = block(jnp.ones((2, 4, 4, 8)), jnp.ones((2, 12)))
    assert out.shape == (2, size, size, 16)
    assert float(jnp.abs(block.conv_out.kernel[...]).max()) < 1e-4  # init_scale 0
    assert float(jnp.abs(block.conv_in.kernel[...]).max()) > 1e-2


def test_resnet_block_identity_shortcut_when_shapes_agree():
    block = layers.ResnetBlock(8, 8, 4, dropout_rate=0.0, dropout_index=0,
                               skip_rescale=False, init_scale=0.0, rngs=nnx.Rngs(0))
    assert block.shortcut is None
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
    # With the output conv initialised to ~0 the block is the identity.
    np.testing.assert_allclose(block(x, jnp.ones((1, 4))), x, atol=1e-4)
