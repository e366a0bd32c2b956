"""Score networks and their functional form `apply_fn(params, x, noise_condition, key)`."""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qcsbm_jax.models.ncsnpp import DDPMPP_DEEP, NCSNPP_DEEP, NCSNpp
from qcsbm_jax.models.toy import ToyScoreNet

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]

# 'ncsnpp' and 'ddpmpp' are the same module; the name records which preset a config uses.
MODELS = {"toy_mlp": ToyScoreNet, "ncsnpp": NCSNpp, "ddpmpp": NCSNpp}

# config.model keys that score.py reads rather than the network.
_SCORE_KEYS = ("name", "family", "output")

# functional()'s compute_dtype (training.compute_dtype): the dtype the network computes in.
COMPUTE_DTYPES = ("float32", "bfloat16")


def build_model(model: Mapping[str, Any], data_shape: tuple[int, ...],
                key: jax.Array) -> nnx.Module:
    """Instantiates the network model["name"] for inputs [B, *data_shape].

    model: a config's `model` section (name, family, output and the network's keys).
    Image networks take data_shape = (H, W, C) with H == W and every key of NCSNPP_DEEP.
    """
    name = model["name"]
    if name == "toy_mlp":
        return ToyScoreNet(data_shape[-1], tuple(model["widths"]), tuple(model["noise_widths"]),
                           init=model["init"], head_activation=model["head_activation"],
                           rngs=nnx.Rngs(key))
    if name in ("ncsnpp", "ddpmpp"):
        return _build_image_model(model, data_shape, key)
    raise ValueError(f"Unknown model.name {name!r}; valid names: {sorted(MODELS)}.")


def _build_image_model(model: Mapping[str, Any], data_shape: tuple[int, ...],
                       key: jax.Array) -> NCSNpp:
    if len(data_shape) != 3 or data_shape[0] != data_shape[1]:
        raise ValueError(f"model.name={model['name']!r} needs square images of shape "
                         f"(H, W, C) with H == W, got data shape {tuple(data_shape)}.")
    given = {k: v for k, v in model.items() if k not in _SCORE_KEYS}
    missing = sorted(set(NCSNPP_DEEP) - set(given))
    unknown = sorted(set(given) - set(NCSNPP_DEEP))
    if missing or unknown:
        raise ValueError(f"config.model for {model['name']!r}: missing keys {missing}, "
                         f"unknown keys {unknown}; start from models.NCSNPP_DEEP or "
                         "models.DDPMPP_DEEP, e.g. dict(name=..., family=..., output=..., "
                         "**NCSNPP_DEEP).")
    return NCSNpp(image_size=data_shape[0], channels=data_shape[2], **given,
                  rngs=nnx.Rngs(key))


def functional(model: nnx.Module, compute_dtype: str = "float32") -> tuple[ApplyFn, dict]:
    """Splits an NNX module into a pure `apply_fn` and its trainable parameters.

    Parameters (nnx.Param) become a plain nested dict, the only thing optimisers, EMA and
    checkpoints see; it includes the Fourier frequencies, which the network reads through
    stop_gradient (layers.GaussianFourierEmbedding). Any other variable is closed over by
    `apply_fn`. compute_dtype (COMPUTE_DTYPES): with 'bfloat16', `apply_fn` is
    mixed_precision's; 'float32' adds no cast.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype (training.compute_dtype) must be one of "
                         f"{COMPUTE_DTYPES}, got {compute_dtype!r}.")
    # One state per filter: the parameters, then everything else (buffers).
    graphdef, param_state, buffers = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    params = nnx.to_pure_dict(param_state)

    def apply_fn(params, x, noise_condition, key=None):
        state = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state, buffers)(x, noise_condition, key)

    if compute_dtype == "float32":
        return apply_fn, params
    return mixed_precision(apply_fn, jnp.dtype(compute_dtype)), params


def mixed_precision(apply_fn: ApplyFn, dtype) -> ApplyFn:
    """apply_fn with its matmuls and convolutions in `dtype`, float32 master parameters.

    Only the kernels (parameters named 'kernel') are cast to dtype; every layer casts its
    input to its kernel's dtype (layers.to_kernel_dtype, the attention block's einsums,
    the fused FIR convolutions), so the matmul and convolution flops run in dtype.
    Biases, GroupNorm scales, the toy's Swish slopes and the Fourier frequencies stay
    float32, and with them the activations between layers, the noise embeddings, GroupNorm
    statistics, softmax and every parameter-gradient sum over batch and positions.
    Gradients reach the float32 kernels through the casts, and the output is float32, so
    everything downstream (score.py's division by std, the losses, the penalty, optimiser,
    EMA) stays float32.
    """
    def cast(path, leaf):
        return leaf.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else leaf

    def low_precision_apply_fn(params, x, noise_condition, key=None):
        out = apply_fn(jax.tree_util.tree_map_with_path(cast, params), x, noise_condition,
                       key)
        return out.astype(x.dtype)

    return low_precision_apply_fn
