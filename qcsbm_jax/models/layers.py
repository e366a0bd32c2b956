"""Building blocks of the NCSN++ / DDPM++ image score networks (Flax NNX, NHWC).

Conventions: images are [B, H, W, C]; every layer acts on each sample alone (no batch
statistics), so the Jacobian of a batched output with respect to the batched input is
block diagonal over samples. Weights are initialised as in DDPM / score_sde: variance
scaling (fan_avg, uniform) with a per-layer scale, where scale 0 means 1e-10.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from flax import nnx

_NHWC = ("NHWC", "HWIO", "NHWC")


def default_init(scale: float = 1.0):
    """score_sde's initialiser: variance scaling, fan_avg, uniform; scale 0 means 1e-10."""
    return nnx.initializers.variance_scaling(scale if scale != 0 else 1e-10,
                                             "fan_avg", "uniform")


def to_kernel_dtype(arrays, /, *, dtype=None, inexact=True):
    """nnx.Linear / nnx.Conv `promote_dtype` hook: the input in the kernel's dtype, the bias
    as it is.

    With models.mixed_precision only kernels are cast to the compute dtype (bfloat16), so
    the matmul or convolution runs in it while the bias stays float32: y + bias is float32,
    and the bias gradient, a sum over batch and positions, accumulates in float32. In
    float32 it changes nothing. dtype, inexact: unused (the modules leave dtype None).
    """
    del dtype, inexact
    inputs, kernel, bias = arrays
    return inputs.astype(kernel.dtype), kernel, bias


def conv3x3(in_ch: int, out_ch: int, *, init_scale: float = 1.0, stride: int = 1,
            rngs: nnx.Rngs) -> nnx.Conv:
    """3x3 convolution, SAME padding, zero bias."""
    return nnx.Conv(in_ch, out_ch, (3, 3), strides=stride, padding="SAME",
                    kernel_init=default_init(init_scale), promote_dtype=to_kernel_dtype,
                    rngs=rngs)


def conv1x1(in_ch: int, out_ch: int, *, init_scale: float = 1.0, rngs: nnx.Rngs) -> nnx.Conv:
    """1x1 convolution (a per-pixel linear map over channels), zero bias."""
    return nnx.Conv(in_ch, out_ch, (1, 1), kernel_init=default_init(init_scale),
                    promote_dtype=to_kernel_dtype, rngs=rngs)


def dense(in_features: int, out_features: int, *, init_scale: float = 1.0,
          rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=default_init(init_scale),
                      promote_dtype=to_kernel_dtype, rngs=rngs)


def group_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm with min(channels // 4, 32) groups (per sample; no batch statistics)."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups:
        raise ValueError(
            f"GroupNorm over {channels} channels needs min(C // 4, 32) groups to divide C; "
            "choose model.nf a multiple of 32 (the paper uses 128) or 8 or 16 for tiny tests.")
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, rngs=rngs)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with a mask drawn from `key`; identity when key is None or rate 0."""
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------
# Noise-level embeddings.

FOURIER_SEED = 0


class GaussianFourierEmbedding(nnx.Module):
    """[sin(2 pi w c), cos(2 pi w c)] of a scalar c per sample, w ~ N(0, scale^2) fixed.

    The frequencies w [size] are an nnx.Param, so checkpoints carry them (a model imported
    from PyTorch keeps its own), but they are never trained: the network reads them
    through lax.stop_gradient, so their gradient is exactly zero for every loss (the QC
    penalty included), Adam leaves them unchanged and the EMA keeps them. They are drawn
    from a fixed key (FOURIER_SEED), not from the model's seed: part of the architecture,
    the same in every build whatever config.seed. Weight decay, were it ever added, must
    leave them out.
    """

    def __init__(self, size: int, scale: float):
        key = jax.random.key(FOURIER_SEED)
        self.frequencies = nnx.Param(scale * jax.random.normal(key, (size,)))

    def __call__(self, c: jax.Array) -> jax.Array:
        """c: [B] -> [B, 2 * size]."""
        frequencies = lax.stop_gradient(self.frequencies[...])
        angles = 2 * math.pi * c[:, None] * frequencies[None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sinusoidal_embedding(c: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Transformer / DDPM positional embedding of c [B] -> [B, dim] (dim even, >= 4).

    Frequencies max_period^(-i / (dim/2 - 1)), i = 0 .. dim/2 - 1; sines then cosines.
    """
    half = dim // 2
    if dim % 2 or half < 2:
        raise ValueError(f"The positional embedding needs an even size >= 4, got {dim}.")
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half) / (half - 1))
    angles = c[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


# ----------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2 / score_sde semantics, zero padding at the borders).

def fir_taps(kernel: Sequence[float]) -> np.ndarray:
    """1D FIR taps normalised to sum 1; the 2D filter is their outer product (sum 1)."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 1 or k.size < 1:
        raise ValueError(f"fir_kernel must be a 1D sequence of taps, got {kernel!r}.")
    return k / k.sum()


def upfirdn2d(x: jax.Array, kernel: np.ndarray | jax.Array, *, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> jax.Array:
    """Upsample, FIR-filter, downsample each channel of x [B, H, W, C].

    Exactly: insert up - 1 zeros after every pixel (H -> H * up), pad pad[0] zeros before
    and pad[1] after (negative crops), convolve with the 2D kernel (a true convolution,
    i.e. the kernel flipped), keep every down-th pixel. Output side
    (H * up + pad[0] + pad[1] - kh) // down + 1.

    kernel: [kh, kw], one depthwise lax.conv_general_dilated; or 1D taps [k] for the
    separable kernel outer(taps, taps), filtered along H then W as k shifted, strided
    slices of one lax.pad (which inserts the zeros): the same sums, several times faster
    on CPU than XLA's dilated depthwise convolution (docs/benchmarks.md).
    """
    if np.ndim(kernel) == 1:
        return _upfirdn1d(_upfirdn1d(x, kernel, 1, up, down, pad), kernel, 2, up, down, pad)
    channels = x.shape[-1]
    k = jnp.asarray(kernel, x.dtype)[::-1, ::-1]
    weights = jnp.broadcast_to(k[:, :, None, None], k.shape + (1, channels))
    padding = ((pad[0], pad[1] + up - 1),) * 2
    return lax.conv_general_dilated(x, weights, (down, down), padding, lhs_dilation=(up, up),
                                    dimension_numbers=_NHWC, feature_group_count=channels)


def _upfirdn1d(x: jax.Array, taps: np.ndarray | jax.Array, axis: int, up: int, down: int,
               pad: tuple[int, int]) -> jax.Array:
    """upfirdn2d along one axis of x with 1D taps [k] (a sum of k shifted slices)."""
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (pad[0], pad[1] + up - 1, up - 1)
    padded = lax.pad(x, jnp.zeros((), x.dtype), config)
    size = (padded.shape[axis] - len(taps)) // down + 1
    terms = [float(tap) * lax.slice_in_dim(padded, offset, offset + (size - 1) * down + 1,
                                           stride=down, axis=axis)
             for offset, tap in enumerate(np.asarray(taps)[::-1])]
    return sum(terms[1:], terms[0])


def fir_upsample(x: jax.Array, kernel: Sequence[float], factor: int = 2) -> jax.Array:
    """FIR upsampling by `factor`: [B, H, W, C] -> [B, H f, W f, C] (a constant stays constant
    away from the borders)."""
    k = fir_taps(kernel) * factor
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample(x: jax.Array, kernel: Sequence[float], factor: int = 2) -> jax.Array:
    """FIR downsampling by `factor`: [B, H, W, C] -> [B, H / f, W / f, C]."""
    k = fir_taps(kernel)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def fir_upsample_conv(x: jax.Array, weights: jax.Array, kernel: Sequence[float]) -> jax.Array:
    """2x upsampling convolution: a stride-2 transposed convolution by `weights`
    [k, k, C_in, C_out] followed by the FIR filter. [B, H, W, C_in] -> [B, 2H, 2W, C_out]."""
    size = weights.shape[0]
    h = lax.conv_general_dilated(x.astype(weights.dtype), weights, (1, 1),
                                 ((size - 1, size - 1),) * 2, lhs_dilation=(2, 2),
                                 dimension_numbers=_NHWC)
    k = fir_taps(kernel) * 2
    p = k.shape[0] - 2 - (size - 1)
    return upfirdn2d(h, k, pad=((p + 1) // 2 + 1, p // 2 + 1))


def fir_downsample_conv(x: jax.Array, weights: jax.Array, kernel: Sequence[float]) -> jax.Array:
    """2x downsampling convolution: the FIR filter followed by a stride-2 VALID convolution
    by `weights` [k, k, C_in, C_out]. [B, H, W, C_in] -> [B, H/2, W/2, C_out]."""
    size = weights.shape[0]
    k = fir_taps(kernel)
    p = k.shape[0] - 2 + (size - 1)
    h = upfirdn2d(x.astype(weights.dtype), k, pad=((p + 1) // 2, p // 2))
    return lax.conv_general_dilated(h, weights, (2, 2), "VALID", dimension_numbers=_NHWC)


def nearest_upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling, [B, H, W, C] -> [B, 2H, 2W, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def mean_downsample(x: jax.Array) -> jax.Array:
    """2x2 average pooling, [B, H, W, C] -> [B, H/2, W/2, C]."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class _FIRConv(nnx.Module):
    """Weights [3, 3, C_in, C_out] and bias of a fused FIR resampling convolution."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(default_init()(rngs.params(), (3, 3, in_ch, out_ch)))
        self.bias = nnx.Param(jnp.zeros((out_ch,)))


class Upsample(nnx.Module):
    """2x upsampling, [B, H, W, in_ch] -> [B, 2H, 2W, out_ch].

    fir: FIR upsampling (fused with a 3x3 transposed convolution when with_conv);
    otherwise nearest neighbour (followed by a 3x3 convolution when with_conv).
    Without a convolution out_ch must equal in_ch.
    """

    def __init__(self, in_ch: int, out_ch: int, *, with_conv: bool, fir: bool,
                 fir_kernel: Sequence[float], rngs: nnx.Rngs):
        _check_resample_channels(in_ch, out_ch, with_conv)
        self.fir, self.fir_kernel = fir, tuple(fir_kernel)
        self.conv = _resample_conv(in_ch, out_ch, with_conv, fir, stride=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.fir:
            h = nearest_upsample(x)
            return h if self.conv is None else self.conv(h)
        if self.conv is None:
            return fir_upsample(x, self.fir_kernel)
        return fir_upsample_conv(x, self.conv.kernel[...], self.fir_kernel) + self.conv.bias[...]


class Downsample(nnx.Module):
    """2x downsampling, [B, H, W, in_ch] -> [B, H/2, W/2, out_ch].

    fir: FIR downsampling (fused with a 3x3 stride-2 convolution when with_conv);
    otherwise 2x2 average pooling, or a 3x3 stride-2 convolution when with_conv.
    """

    def __init__(self, in_ch: int, out_ch: int, *, with_conv: bool, fir: bool,
                 fir_kernel: Sequence[float], rngs: nnx.Rngs):
        _check_resample_channels(in_ch, out_ch, with_conv)
        self.fir, self.fir_kernel = fir, tuple(fir_kernel)
        self.conv = _resample_conv(in_ch, out_ch, with_conv, fir, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.fir:
            return mean_downsample(x) if self.conv is None else self.conv(x)
        if self.conv is None:
            return fir_downsample(x, self.fir_kernel)
        return (fir_downsample_conv(x, self.conv.kernel[...], self.fir_kernel)
                + self.conv.bias[...])


def _check_resample_channels(in_ch: int, out_ch: int, with_conv: bool) -> None:
    if not with_conv and in_ch != out_ch:
        raise ValueError(f"Resampling without a convolution keeps the channels; "
                         f"got in_ch={in_ch}, out_ch={out_ch}.")


def _resample_conv(in_ch: int, out_ch: int, with_conv: bool, fir: bool, *, stride: int,
                   rngs: nnx.Rngs):
    """The convolution of an Up/Downsample: fused FIR weights, a 3x3 conv, or None."""
    if not with_conv:
        return None
    if fir:
        return _FIRConv(in_ch, out_ch, rngs=rngs)
    return conv3x3(in_ch, out_ch, stride=stride, rngs=rngs)


# ----------------------------------------------------------------------------------------
# Blocks.

class ResnetBlock(nnx.Module):
    """Pre-activation residual block conditioned on a noise embedding.

    h = conv(act(GN(x))) [resampled before the conv when resample is 'up'/'down'],
    h += dense(act(temb)), h = conv_out(dropout(act(GN(h)))); out = (skip(x) + h), divided
    by sqrt(2) when skip_rescale. skip is a 1x1 convolution when the channels change or
    the block resamples, the identity otherwise.

    resample='up'/'down' gives BigGAN's block (FIR or nearest / mean resampling of both
    branches); resample=None with shortcut_init_scale 0.1 is DDPM++'s block. conv_out is
    initialised with init_scale. `dropout_index` is folded into the dropout key, so every
    block draws its own mask and the same key always gives the same network.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, *, dropout_rate: float,
                 dropout_index: int, skip_rescale: bool, init_scale: float,
                 resample: str | None = None, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1),
                 shortcut_init_scale: float = 1.0, rngs: nnx.Rngs):
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}.")
        self.resample, self.fir, self.fir_kernel = resample, fir, tuple(fir_kernel)
        self.dropout_rate, self.dropout_index = dropout_rate, dropout_index
        self.skip_rescale = skip_rescale
        self.norm_in = group_norm(in_ch, rngs=rngs)
        self.conv_in = conv3x3(in_ch, out_ch, rngs=rngs)
        self.temb_proj = dense(temb_dim, out_ch, rngs=rngs)
        self.norm_out = group_norm(out_ch, rngs=rngs)
        self.conv_out = conv3x3(out_ch, out_ch, init_scale=init_scale, rngs=rngs)
        self.shortcut = (conv1x1(in_ch, out_ch, init_scale=shortcut_init_scale, rngs=rngs)
                         if in_ch != out_ch or resample is not None else None)

    def _resample(self, x: jax.Array) -> jax.Array:
        if self.resample == "up":
            return fir_upsample(x, self.fir_kernel) if self.fir else nearest_upsample(x)
        if self.resample == "down":
            return fir_downsample(x, self.fir_kernel) if self.fir else mean_downsample(x)
        return x

    def __call__(self, x: jax.Array, temb: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, in_ch]; temb: [B, temb_dim]. Returns [B, H', W', out_ch]."""
        h = self._resample(nnx.swish(self.norm_in(x)))
        x = self._resample(x)
        h = self.conv_in(h) + self.temb_proj(nnx.swish(temb))[:, None, None, :]
        h = nnx.swish(self.norm_out(h))
        key = None if dropout_key is None else jax.random.fold_in(dropout_key,
                                                                  self.dropout_index)
        h = self.conv_out(dropout(h, self.dropout_rate, key))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return residual_sum(x, h, self.skip_rescale)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H x W positions of each sample (DDPM's block).

    q, k, v are 1x1 maps of GN(x) (init scale 0.1); the output map uses init_scale;
    out = x + attn (divided by sqrt(2) when skip_rescale).
    """

    def __init__(self, channels: int, *, skip_rescale: bool, init_scale: float,
                 rngs: nnx.Rngs):
        self.skip_rescale = skip_rescale
        self.norm = group_norm(channels, rngs=rngs)
        self.query = dense(channels, channels, init_scale=0.1, rngs=rngs)
        self.key = dense(channels, channels, init_scale=0.1, rngs=rngs)
        self.value = dense(channels, channels, init_scale=0.1, rngs=rngs)
        self.out = dense(channels, channels, init_scale=init_scale, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, height, width, c = x.shape
        h = self.norm(x).reshape(b, height * width, c)
        dtype = self.query.kernel.dtype  # The compute dtype (models.mixed_precision).
        q, k, v = (layer(h).astype(dtype) for layer in (self.query, self.key, self.value))
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v)
        return residual_sum(x, self.out(h).reshape(x.shape), self.skip_rescale)


class Combine(nnx.Module):
    """Merges a progressive-input image pyramid level into features: a 1x1 map of the
    pyramid to the features' channels, then 'sum' (C channels) or 'cat' (2C channels)."""

    def __init__(self, pyramid_ch: int, channels: int, method: str, *, rngs: nnx.Rngs):
        if method not in ("sum", "cat"):
            raise ValueError(f"progressive_combine must be 'sum' or 'cat', got {method!r}.")
        self.method = method
        self.proj = conv1x1(pyramid_ch, channels, rngs=rngs)

    def __call__(self, pyramid: jax.Array, h: jax.Array) -> jax.Array:
        p = self.proj(pyramid)
        return p + h if self.method == "sum" else jnp.concatenate([p, h], axis=-1)


def residual_sum(x: jax.Array, h: jax.Array, rescale: bool) -> jax.Array:
    """x + h, divided by sqrt(2) when rescale (score_sde's skip rescaling)."""
    return (x + h) / math.sqrt(2.0) if rescale else x + h
