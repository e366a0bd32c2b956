"""Score networks and their functional form `apply_fn(params, x, noise_condition, key)`."""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from qcsbm_jax.models.toy import ToyScoreNet

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]

MODELS = {"toy_mlp": ToyScoreNet}


def build_model(config: ml_collections.ConfigDict, data_shape: tuple[int, ...],
                key: jax.Array) -> nnx.Module:
    """Instantiates the network named by `config.model.name` for inputs [B, *data_shape]."""
    name = config.model.name
    if name == "toy_mlp":
        return ToyScoreNet(data_shape[-1], tuple(config.model.widths),
                           tuple(config.model.noise_widths), rngs=nnx.Rngs(key))
    raise ValueError(f"Unknown model.name {name!r}; valid names: {sorted(MODELS)}.")


def functional(model: nnx.Module) -> tuple[ApplyFn, dict]:
    """Splits an NNX module into a pure `apply_fn` and its trainable parameters.

    Parameters (nnx.Param) become a plain nested dict, the only thing optimisers, EMA and
    checkpoints see. Every other variable (fixed buffers such as Fourier frequencies) is
    closed over by `apply_fn`, so it is never trained, decayed or checkpointed.
    """
    graphdef, param_state, buffers = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)

    def apply_fn(params, x, noise_condition, key=None):
        state = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state, buffers)(x, noise_condition, key)

    return apply_fn, params
