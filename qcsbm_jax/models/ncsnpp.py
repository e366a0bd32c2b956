"""NCSN++ / DDPM++ (Song et al., score_sde) in Flax NNX: a U-Net score network f(x, c).

One module covers both: NCSN++ (VE SDE) uses the Gaussian Fourier embedding of log sigma,
FIR resampling and progressive input; DDPM++ (VP / sub-VP SDE) is the same module with the
sinusoidal embedding and neither FIR nor progressive paths. `NCSNPP_DEEP` and `DDPMPP_DEEP`
hold the "continuous deep" hyper-parameters of each (everything but image_size, channels
and rngs).

The network returns the raw output f; `qcsbm_jax.score` turns it into a score (s = f / std)
or an energy (E = ||f / std||^2 / 2), so nothing here divides by sigma.
"""

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qcsbm_jax.models.layers import (
    AttentionBlock, Combine, Downsample, GaussianFourierEmbedding, ResnetBlock, Upsample,
    conv3x3, dense, fir_downsample, fir_upsample, group_norm, mean_downsample,
    nearest_upsample, residual_sum, sinusoidal_embedding)

RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDINGS = ("fourier", "positional")

# The paper's NCSN++ "continuous deep" as docs/method.md states it: input-skip progressive input, no
# progressive output. (The authors' released config and score_sde's
# cifar10_ncsnpp_deep_continuous use progressive_input='residual'; override that one key to
# match them.)
NCSNPP_DEEP = dict(
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,), dropout=0.1,
    resamp_with_conv=True, fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
    resblock_type="biggan", progressive="none", progressive_input="input_skip",
    progressive_combine="sum", embedding_type="fourier", fourier_scale=16.0,
    init_scale=0.0, center_input=True)

# score_sde's cifar10_ddpmpp_deep_continuous. Its data are centred ([-1, 1]) by the input
# pipeline, hence center_input=False; set it True for data in [0, 1].
DDPMPP_DEEP = dict(
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,), dropout=0.1,
    resamp_with_conv=True, fir=False, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
    resblock_type="biggan", progressive="none", progressive_input="none",
    progressive_combine="sum", embedding_type="positional", fourier_scale=16.0,
    init_scale=0.0, center_input=False)

# The labels score_sde feeds the sinusoidal embedding: 999 t for t in [0, 1].
POSITIONAL_SCALE = 999.0


class _Level(nnx.Module):
    """The modules of one resolution of the U-Net; absent parts are None / empty."""

    def __init__(self, blocks: list, attentions: list, pyramid=None, resample=None):
        self.blocks = nnx.List(blocks)
        self.attentions = nnx.List(attentions)
        self.pyramid = pyramid
        self.resample = resample


class _OutputHead(nnx.Module):
    """3x3 convolution of swish(GroupNorm(h))."""

    def __init__(self, in_ch: int, out_ch: int, init_scale: float, *, rngs: nnx.Rngs):
        self.norm = group_norm(in_ch, rngs=rngs)
        self.conv = conv3x3(in_ch, out_ch, init_scale=init_scale, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.conv(nnx.swish(self.norm(h)))


class NCSNpp(nnx.Module):
    """NCSN++ / DDPM++ U-Net: f(x [B, H, W, C], c [B]) -> [B, H, W, C].

    The noise condition c is embedded according to `embedding_type`:
      'fourier':    Gaussian Fourier features of log(c), frequencies ~ N(0, fourier_scale^2)
                    in params['fourier']['frequencies'], never trained (VE SDE: c = sigma(t));
      'positional': sinusoidal features of 999 c (VP / sub-VP SDE: c = t in [0, 1]).
    center_input maps x -> 2x - 1 first (data in [0, 1]).

    Layout (score_sde's): a 3x3 input convolution; per resolution `num_res_blocks` residual
    blocks (self-attention after each at `attn_resolutions`), then a 2x downsampling
    (a BigGAN block with down=True, or a Downsample for resblock_type='ddpm'); a middle
    block-attention-block; the mirrored upsampling path with num_res_blocks + 1 blocks per
    resolution fed the stored skips; GroupNorm, swish and a 3x3 output convolution
    (init_scale). Progressive input ('input_skip': FIR / mean-downsampled image combined
    by `progressive_combine`; 'residual': a downsampling conv of the image pyramid added to
    the features) and progressive output ('output_skip': per-resolution image outputs
    upsampled and summed; 'residual': an upsampling-conv feature pyramid) are optional.
    Dropout masks come from `dropout_key` (a per-block index folded in); with no key, or
    dropout 0, the network is deterministic. No batch statistics are used anywhere.
    """

    def __init__(self, *, image_size: int, channels: int, nf: int, ch_mult: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int], dropout: float,
                 resamp_with_conv: bool, fir: bool, fir_kernel: Sequence[float],
                 skip_rescale: bool, resblock_type: str, progressive: str,
                 progressive_input: str, progressive_combine: str, embedding_type: str,
                 fourier_scale: float, init_scale: float, center_input: bool,
                 rngs: nnx.Rngs):
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        _validate(image_size, channels, nf, ch_mult, num_res_blocks, attn_resolutions,
                  dropout, resblock_type, progressive, progressive_input,
                  progressive_combine, embedding_type)
        self.image_size, self.channels, self.nf = image_size, channels, nf
        self.embedding_type, self.center_input = embedding_type, center_input
        self.progressive, self.progressive_input = progressive, progressive_input
        self.skip_rescale, self.fir, self.fir_kernel = skip_rescale, fir, tuple(fir_kernel)
        self.biggan = resblock_type == "biggan"
        num_levels = len(ch_mult)
        temb_dim = 4 * nf
        dropout_index = itertools.count()

        def resblock(in_ch, out_ch, resample=None):
            return ResnetBlock(
                in_ch, out_ch, temb_dim, dropout_rate=dropout,
                dropout_index=next(dropout_index), skip_rescale=skip_rescale,
                init_scale=init_scale, resample=resample, fir=fir, fir_kernel=fir_kernel,
                shortcut_init_scale=1.0 if self.biggan else 0.1, rngs=rngs)

        def attention(ch):
            return AttentionBlock(ch, skip_rescale=skip_rescale, init_scale=init_scale,
                                  rngs=rngs)

        def resampler(cls, in_ch, out_ch, with_conv):
            return cls(in_ch, out_ch, with_conv=with_conv, fir=fir, fir_kernel=fir_kernel,
                       rngs=rngs)

        self.fourier = (GaussianFourierEmbedding(nf, fourier_scale)
                        if embedding_type == "fourier" else None)
        self.temb_in = dense(2 * nf if embedding_type == "fourier" else nf, temb_dim, rngs=rngs)
        self.temb_out = dense(temb_dim, temb_dim, rngs=rngs)
        self.conv_in = conv3x3(channels, nf, rngs=rngs)

        skip_channels, in_ch, pyramid_ch = [nf], nf, channels
        down_levels = []
        for level, mult in enumerate(ch_mult):
            with_attention = (image_size >> level) in attn_resolutions
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(resblock(in_ch, nf * mult))
                in_ch = nf * mult
                attentions += [attention(in_ch)] if with_attention else []
                skip_channels.append(in_ch)
            pyramid: nnx.Module | None = None
            resample: nnx.Module | None = None
            if level < num_levels - 1:
                resample = (resblock(in_ch, in_ch, "down") if self.biggan
                            else resampler(Downsample, in_ch, in_ch, resamp_with_conv))
                if progressive_input == "input_skip":
                    pyramid = Combine(channels, in_ch, progressive_combine, rngs=rngs)
                    in_ch *= 2 if progressive_combine == "cat" else 1
                elif progressive_input == "residual":
                    pyramid = resampler(Downsample, pyramid_ch, in_ch, True)
                    pyramid_ch = in_ch
                skip_channels.append(in_ch)
            down_levels.append(_Level(blocks, attentions, pyramid, resample))
        self.down_levels = nnx.List(down_levels)

        self.mid_block1 = resblock(in_ch, in_ch)
        self.mid_attention = attention(in_ch)
        self.mid_block2 = resblock(in_ch, in_ch)

        up_levels = []
        for level in reversed(range(num_levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(resblock(in_ch + skip_channels.pop(), nf * ch_mult[level]))
                in_ch = nf * ch_mult[level]
            attentions = [attention(in_ch)] if (image_size >> level) in attn_resolutions else []
            pyramid = resample = None
            if progressive == "output_skip":
                pyramid = _OutputHead(in_ch, channels, init_scale, rngs=rngs)
            elif progressive == "residual":
                pyramid = (_OutputHead(in_ch, in_ch, 1.0, rngs=rngs) if level == num_levels - 1
                           else resampler(Upsample, pyramid_ch, in_ch, True))
                pyramid_ch = in_ch
            if level > 0:
                resample = (resblock(in_ch, in_ch, "up") if self.biggan
                            else resampler(Upsample, in_ch, in_ch, resamp_with_conv))
            up_levels.append(_Level(blocks, attentions, pyramid, resample))
        self.up_levels = nnx.List(up_levels)
        self.head = (None if progressive == "output_skip"
                     else _OutputHead(in_ch, channels, init_scale, rngs=rngs))

    def __call__(self, x: jax.Array, noise_condition: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, C] float; noise_condition: [B] (sigma for 'fourier', t for
        'positional'); dropout_key: None for no dropout. Returns f [B, H, W, C], x's dtype."""
        self._check_inputs(x, noise_condition)
        temb = self.temb_out(nnx.swish(self.temb_in(self._embed(noise_condition))))
        key = dropout_key
        image = 2 * x - 1 if self.center_input else x

        hs = [self.conv_in(image)]
        for level in self.down_levels:
            for i, block in enumerate(level.blocks):
                h = block(hs[-1], temb, key)
                hs.append(level.attentions[i](h) if level.attentions else h)
            if level.resample is None:
                continue
            h = level.resample(hs[-1], temb, key) if self.biggan else level.resample(hs[-1])
            if self.progressive_input == "input_skip":
                image = self._downsample_image(image)
                h = level.pyramid(image, h)
            elif self.progressive_input == "residual":
                image = h = residual_sum(level.pyramid(image), h, self.skip_rescale)
            hs.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(hs[-1], temb, key)), temb, key)

        pyramid = None
        for level in self.up_levels:
            for block in level.blocks:
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), temb, key)
            for attention in level.attentions:
                h = attention(h)
            if self.progressive == "output_skip":
                out = level.pyramid(h)
                pyramid = out if pyramid is None else self._upsample_image(pyramid) + out
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = level.pyramid(h)
                else:
                    pyramid = h = residual_sum(level.pyramid(pyramid), h, self.skip_rescale)
            if level.resample is not None:
                h = level.resample(h, temb, key) if self.biggan else level.resample(h)

        if self.head is not None:
            return self.head(h).astype(x.dtype)
        assert pyramid is not None  # progressive='output_skip': the output pyramid's sum
        return pyramid.astype(x.dtype)

    def _embed(self, noise_condition: jax.Array) -> jax.Array:
        if self.fourier is not None:
            return self.fourier(jnp.log(noise_condition))
        return sinusoidal_embedding(POSITIONAL_SCALE * noise_condition, self.nf)

    def _downsample_image(self, x: jax.Array) -> jax.Array:
        return fir_downsample(x, self.fir_kernel) if self.fir else mean_downsample(x)

    def _upsample_image(self, x: jax.Array) -> jax.Array:
        return fir_upsample(x, self.fir_kernel) if self.fir else nearest_upsample(x)

    def _check_inputs(self, x: jax.Array, noise_condition: jax.Array) -> None:
        expected = (self.image_size, self.image_size, self.channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"NCSNpp expects images of shape [B, {', '.join(map(str, expected))}]"
                             f" (NHWC), got {tuple(x.shape)}.")
        if tuple(noise_condition.shape) != (x.shape[0],):
            raise ValueError(f"noise_condition must have shape [B] = ({x.shape[0]},), "
                             f"got {tuple(noise_condition.shape)}.")


def _validate(image_size, channels, nf, ch_mult, num_res_blocks, attn_resolutions,
              dropout, resblock_type, progressive, progressive_input, progressive_combine,
              embedding_type) -> None:
    """Raises ValueError naming the bad model.* setting and what to use instead."""
    choices = [("resblock_type", resblock_type, RESBLOCK_TYPES),
               ("progressive", progressive, PROGRESSIVE),
               ("progressive_input", progressive_input, PROGRESSIVE_INPUT),
               ("progressive_combine", progressive_combine, PROGRESSIVE_COMBINE),
               ("embedding_type", embedding_type, EMBEDDINGS)]
    for name, value, valid in choices:
        if value not in valid:
            raise ValueError(f"model.{name}={value!r} is not valid; choose one of {valid}.")
    if not ch_mult or num_res_blocks < 1 or nf < 4 or channels < 1:
        raise ValueError("model.ch_mult must be non-empty, model.num_res_blocks >= 1, "
                         f"model.nf >= 4; got {ch_mult}, {num_res_blocks}, {nf}.")
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be divisible by 2^(len(ch_mult) - 1)"
                         f" = {factor}; use fewer model.ch_mult entries.")
    resolutions = [image_size >> level for level in range(len(ch_mult))]
    unused = set(attn_resolutions) - set(resolutions)
    if unused:
        raise ValueError(f"model.attn_resolutions {sorted(unused)} match no resolution of the "
                         f"network {resolutions}; use a subset of them (or ()).")
    if not 0 <= dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}.")
