"""The paper's 2D toy network: a Swish MLP on x joined with a tiny MLP on sigma."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class LearnableSwish(nnx.Module):
    """Swish x * sigmoid(beta * x) with one learnable beta per unit (initialised to 1)."""

    def __init__(self, features: int):
        self.beta = nnx.Param(jnp.ones((features,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.nn.sigmoid(self.beta[...] * x)


class SwishMLP(nnx.Module):
    """Linear layers of the given widths with a learnable Swish after each but the last."""

    def __init__(self, in_features: int, widths: Sequence[int], *, rngs: nnx.Rngs):
        sizes = (in_features, *widths)
        self.linears = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.activations = nnx.List([LearnableSwish(w) for w in widths[:-1]])

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, activation in zip(self.linears, self.activations):
            x = activation(linear(x))
        return self.linears[-1](x)


class ToyScoreNet(nnx.Module):
    """f(x, sigma) in R^D for the 2D experiments (docs/method.md, experiment 2).

    x -> 64 -> 128 -> 256 and sigma -> 1 -> 1 -> 1 (Swish with learnable beta between
    layers), concatenated (257), Swish, linear to D. The score parameterisation that turns
    f into a score (or an energy) lives in `qcsbm_jax.score`.
    """

    def __init__(self, data_dim: int = 2, widths: Sequence[int] = (64, 128, 256),
                 noise_widths: Sequence[int] = (1, 1, 1), *, rngs: nnx.Rngs):
        self.x_branch = SwishMLP(data_dim, widths, rngs=rngs)
        self.noise_branch = SwishMLP(1, noise_widths, rngs=rngs)
        joint = widths[-1] + noise_widths[-1]
        self.joint_activation = LearnableSwish(joint)
        self.head = nnx.Linear(joint, data_dim, rngs=rngs)

    def __call__(self, x: jax.Array, noise_condition: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [B, D]; noise_condition: [B] (sigma for VE). Returns [B, D]."""
        del dropout_key  # The toy network has no dropout.
        h = jnp.concatenate(
            [self.x_branch(x), self.noise_branch(noise_condition[:, None])], axis=-1)
        return self.head(self.joint_activation(h))
