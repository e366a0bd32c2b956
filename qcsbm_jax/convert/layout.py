"""Where each tensor of the official PyTorch NCSN++ / DDPM++ lives in our parameter tree.

score_sde_pytorch's NCSNpp (the QCSBM code uses it unchanged) keeps its layers in one flat
nn.ModuleList, `all_modules`, in the order its constructor creates them, so a state dict
names a tensor 'all_modules.<index>.<layer>.<weight|bias|W|b>' (and a model wrapped in
DataParallel, as both codes train it, prefixes 'module.'). `official_layout` walks that
order and pairs every name with our path and the change of layout (`Tensor.kind`):

  kind       PyTorch                              ours
  conv       Conv2d weight [O, I, kh, kw]         kernel [kh, kw, I, O]
  linear     Linear weight [O, I]                 kernel [I, O]
  nin        NIN W [I, O] (attention maps)        kernel [I, O]
  nin_conv   NIN W [I, O] (DDPM block shortcut)   kernel [1, 1, I, O]
  vector     biases, NIN b, GroupNorm weight,     bias, bias, scale, frequencies
             Fourier W

Its order is the module's parameter order (model.parameters()), which the EMA's
shadow_params and the optimizer's state follow. The Fourier W has requires_grad=False:
a parameter (in the state dict and in parameters()) that no EMA or optimizer tracks.

The network's output differs by the SDE: for VE score = output (already divided by
sigma), for VP and sub-VP score = -output / std; ours is score = f / std for both
(score.py, 'scaled'). A VP / sub-VP import therefore negates the output convolutions
(`output_paths`), and an export negates them back.
"""

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

# Official config.sde names of the networks whose output is minus the scaled score.
NEGATED_OUTPUT_SDES = ("vp", "subvp")
STATE_DICT_PREFIX = "module."  # DataParallel's
SIGMAS = "sigmas"  # NCSNpp's buffer of discrete noise levels: no parameter


class ConvertError(ValueError):
    """A checkpoint that does not fit the config, or cannot be converted at all."""


TO_OURS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: w.transpose(2, 3, 1, 0),
    "linear": lambda w: w.T,
    "nin": lambda w: w,
    "nin_conv": lambda w: w[None, None],
    "vector": lambda w: w,
}
TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda k: k.transpose(3, 2, 0, 1),
    "linear": lambda k: k.T,
    "nin": lambda k: k,
    "nin_conv": lambda k: k[0, 0],
    "vector": lambda k: k,
}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One official tensor: its state-dict name (no 'module.'), our path in params, its
    `kind` (module doc) and whether it is trainable (tracked by EMA and optimizer)."""
    name: str
    path: tuple
    kind: str
    trainable: bool = True


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The official shape of a tensor of ours of this kind and shape."""
    return TO_TORCH[kind](np.broadcast_to(np.zeros((), np.bool_), shape)).shape


def _layer(prefix: str, path: tuple, weight: str = "conv",
           names: tuple[str, str] = ("weight", "bias")) -> list[Tensor]:
    """A weight and a bias: conv, linear or NIN (names W, b), or GroupNorm ('norm')."""
    if weight == "norm":
        return [Tensor(f"{prefix}.weight", path + ("scale",), "vector"),
                Tensor(f"{prefix}.bias", path + ("bias",), "vector")]
    return [Tensor(f"{prefix}.{names[0]}", path + ("kernel",), weight),
            Tensor(f"{prefix}.{names[1]}", path + ("bias",), "vector")]


def _resblock(prefix: str, path: tuple, node: Mapping, biggan: bool) -> list[Tensor]:
    tensors = (_layer(f"{prefix}.GroupNorm_0", path + ("norm_in",), "norm")
               + _layer(f"{prefix}.Conv_0", path + ("conv_in",))
               + _layer(f"{prefix}.Dense_0", path + ("temb_proj",), "linear")
               + _layer(f"{prefix}.GroupNorm_1", path + ("norm_out",), "norm")
               + _layer(f"{prefix}.Conv_1", path + ("conv_out",)))
    if node.get("shortcut"):  # a channel change, or a BigGAN block that resamples
        tensors += (_layer(f"{prefix}.Conv_2", path + ("shortcut",)) if biggan else
                    _layer(f"{prefix}.NIN_0", path + ("shortcut",), "nin_conv", ("W", "b")))
    return tensors


def _attention(prefix: str, path: tuple) -> list[Tensor]:
    tensors = _layer(f"{prefix}.GroupNorm_0", path + ("norm",), "norm")
    for i, name in enumerate(("query", "key", "value", "out")):
        tensors += _layer(f"{prefix}.NIN_{i}", path + (name,), "nin", ("W", "b"))
    return tensors


def _resampler(prefix: str, path: tuple, node: Mapping, fir: bool) -> list[Tensor]:
    """layerspp.Upsample / Downsample: a (FIR) convolution, or nothing without one."""
    if not node.get("conv"):
        return []
    return _layer(f"{prefix}.{'Conv2d_0' if fir else 'Conv_0'}", path + ("conv",))


def _child(params: Mapping, path: tuple) -> Mapping:
    node = params
    for key in path:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    return node


def official_layout(model: Mapping, params: Mapping) -> list[Tensor]:
    """The official tensors of the network `model` (config.model) in parameter order.

    params: our (abstract) parameter tree of that network; only consulted for which
    residual blocks have a shortcut and which resamplers a convolution.
    """
    index = itertools.count()
    biggan, fir = model["resblock_type"] == "biggan", model["fir"]
    num_levels, blocks = len(model["ch_mult"]), model["num_res_blocks"]
    tensors: list[Tensor] = []

    def module() -> str:
        return f"all_modules.{next(index)}"

    def add(kind: str, path: tuple) -> None:
        node = _child(params, path)
        if kind == "resblock":
            tensors.extend(_resblock(module(), path, node, biggan))
        elif kind == "attention":
            tensors.extend(_attention(module(), path))
        elif kind == "resampler":
            tensors.extend(_resampler(module(), path, node, fir))
        elif kind == "combine":
            tensors.extend(_layer(f"{module()}.Conv_0", path + ("proj",)))
        elif kind == "head":  # GroupNorm and conv3x3: two modules
            tensors.extend(_layer(module(), path + ("norm",), "norm")
                           + _layer(module(), path + ("conv",)))
        else:
            tensors.extend(_layer(module(), path, kind))

    if model["embedding_type"] == "fourier":
        tensors.append(Tensor(f"{module()}.W", ("fourier", "frequencies"), "vector",
                              trainable=False))
    add("linear", ("temb_in",))
    add("linear", ("temb_out",))
    add("conv", ("conv_in",))
    for level in range(num_levels):
        path = ("down_levels", level)
        attention = bool(_child(params, path + ("attentions",)))
        for block in range(blocks):
            add("resblock", path + ("blocks", block))
            if attention:
                add("attention", path + ("attentions", block))
        if level < num_levels - 1:
            add("resblock" if biggan else "resampler", path + ("resample",))
            if model["progressive_input"] == "input_skip":
                add("combine", path + ("pyramid",))
            elif model["progressive_input"] == "residual":
                add("resampler", path + ("pyramid",))
    add("resblock", ("mid_block1",))
    add("attention", ("mid_attention",))
    add("resblock", ("mid_block2",))
    for up, level in enumerate(reversed(range(num_levels))):
        path = ("up_levels", up)
        for block in range(blocks + 1):
            add("resblock", path + ("blocks", block))
        if _child(params, path + ("attentions",)):
            add("attention", path + ("attentions", 0))
        progressive = model["progressive"]
        if progressive == "output_skip" or (progressive == "residual" and up == 0):
            add("head", path + ("pyramid",))
        elif progressive == "residual":
            add("resampler", path + ("pyramid",))
        if level > 0:
            add("resblock" if biggan else "resampler", path + ("resample",))
    if model["progressive"] != "output_skip":
        add("head", ("head",))
    return tensors


def output_paths(model: Mapping, num_levels: int) -> list[tuple]:
    """Our paths of the convolutions whose outputs sum to the network's output."""
    if model["progressive"] == "output_skip":
        heads = [("up_levels", up, "pyramid", "conv") for up in range(num_levels)]
    else:
        heads = [("head", "conv")]
    return [head + (leaf,) for head in heads for leaf in ("kernel", "bias")]


def leaves(params: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) of every leaf of a nested dict."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def get(params: Mapping, path: tuple) -> Any:
    for key in path:
        params = params[key]
    return params


def put(params: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        params = params.setdefault(key, {})
    params[path[-1]] = value
