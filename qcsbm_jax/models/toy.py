"""The paper's 2D toy network: a Swish MLP on x joined with a tiny MLP on sigma."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qcsbm_jax.models.layers import to_kernel_dtype

# init: 'pytorch' is torch.nn.Linear's default (weights and biases U(+-1/sqrt(fan_in)), the
# authors' code); 'flax' is nnx.Linear's (lecun_normal weights, zero biases).
INITS = ("pytorch", "flax")
# The authors' CSBM applies one of these to the head output (docs/method.md).
HEAD_ACTIVATIONS = {"none": lambda x: x, "elu": jax.nn.elu,
                    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.1)}


def linear(in_features: int, out_features: int, init: str, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A dense layer initialised as `init` (INITS), computing in its kernel's dtype
    (layers.to_kernel_dtype)."""
    if init == "flax":
        return nnx.Linear(in_features, out_features, promote_dtype=to_kernel_dtype, rngs=rngs)
    if init != "pytorch":
        raise ValueError(f"model.init must be one of {INITS}, got {init!r}.")
    bound = 1.0 / math.sqrt(in_features)

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(in_features, out_features, kernel_init=uniform, bias_init=uniform,
                      promote_dtype=to_kernel_dtype, rngs=rngs)


class LearnableSwish(nnx.Module):
    """Swish x * sigmoid(beta * x) with one learnable beta per unit (initialised to 1)."""

    def __init__(self, features: int):
        self.beta = nnx.Param(jnp.ones((features,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.nn.sigmoid(self.beta[...] * x)


class SwishMLP(nnx.Module):
    """Linear layers of the given widths with a learnable Swish after each but the last."""

    def __init__(self, in_features: int, widths: Sequence[int], init: str = "flax", *,
                 rngs: nnx.Rngs):
        sizes = (in_features, *widths)
        self.linears = nnx.List(
            [linear(a, b, init, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.activations = nnx.List([LearnableSwish(w) for w in widths[:-1]])

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, activation in zip(self.linears, self.activations):
            x = activation(linear(x))
        return self.linears[-1](x)


class ToyScoreNet(nnx.Module):
    """f(x, sigma) in R^D for the 2D experiments (docs/method.md, experiment 2).

    x -> 64 -> 128 -> 256 and sigma -> 1 -> 1 -> 1 (Swish with learnable beta between
    layers), concatenated (257), Swish, linear to D, then head_activation (HEAD_ACTIVATIONS;
    the authors use it in CSBM's energy only). init: INITS. The score parameterisation
    that turns f into a score (or an energy) lives in `qcsbm_jax.score`.
    """

    def __init__(self, data_dim: int = 2, widths: Sequence[int] = (64, 128, 256),
                 noise_widths: Sequence[int] = (1, 1, 1), *, init: str = "flax",
                 head_activation: str = "none", rngs: nnx.Rngs):
        if head_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"model.head_activation must be one of "
                             f"{tuple(HEAD_ACTIVATIONS)}, got {head_activation!r}.")
        self.x_branch = SwishMLP(data_dim, widths, init, rngs=rngs)
        self.noise_branch = SwishMLP(1, noise_widths, init, rngs=rngs)
        joint = widths[-1] + noise_widths[-1]
        self.joint_activation = LearnableSwish(joint)
        self.head = linear(joint, data_dim, init, rngs=rngs)
        self.head_activation = head_activation

    def __call__(self, x: jax.Array, noise_condition: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [B, D]; noise_condition: [B] (sigma for VE). Returns [B, D]."""
        del dropout_key  # The toy network has no dropout.
        h = jnp.concatenate(
            [self.x_branch(x), self.noise_branch(noise_condition[:, None])], axis=-1)
        return HEAD_ACTIVATIONS[self.head_activation](self.head(self.joint_activation(h)))


def params_from_torch(state_dict: dict) -> dict:
    """ToyScoreNet parameters (pure dict) from the state_dict of the authors' 2D network
    (chen-hao-chao/qcsbm, 2d_examples/models/simple_score_fn.py; widths 64, 128, 256 and
    1, 1, 1), given as name -> NumPy array (e.g. torch_io.load(path)['model']). Their
    linear weights are [out, in]; ours are [in, out]."""
    def linear(prefix):
        return {"kernel": np.asarray(state_dict[f"{prefix}.weight"]).T,
                "bias": np.asarray(state_dict[f"{prefix}.bias"])}

    def branch(name):
        return {"linears": {i: linear(f"{name}.{2 * i}") for i in range(3)},
                "activations": {i: {"beta": np.asarray(state_dict[f"{name}.{2 * i + 1}.beta"])}
                                for i in range(2)}}

    return {"x_branch": branch("input_network"), "noise_branch": branch("noise_network"),
            "joint_activation": {"beta": np.asarray(state_dict["act_.beta"])},
            "head": linear("concat_network")}
