"""The 2D toy data sets of docs/method.md (experiment 2), generated in JAX from a PRNG key.

With U, U', U'' independent U(0, 1) draws, fresh for every point:

  gaussians8    (z + 8 c_k) / sqrt(2), z ~ N(0, I_2), c_k = (cos k pi/4, sin k pi/4),
                k uniform on {0, ..., 7}: 8 clusters at radius 8 / sqrt(2) with
                per-coordinate std 1 / sqrt(2).
  spirals2      n = 3 pi sqrt(U); a = (-n cos n + U'/2, n sin n + U''/2);
                x = (2.3 / 3) s a with s = +-1 each with probability 1/2 (the two arms).
  checkerboard  x1 ~ U(-2, 2); x2 = U - 2 b + (floor(x1) mod 2), b ~ Bernoulli(1/2);
                x = 3 (x1, x2): the 8 squares of side 3 in [-6, 6]^2 whose integer corners
                (floor(x1), floor(x2)) have an even sum, each with probability 1/8.

Training batches come from `toy_batch`, a pure function of (key, step).
"""

import math

import jax
import jax.numpy as jnp


def _gaussians8(key: jax.Array, num_points: int) -> jax.Array:
    key_k, key_z = jax.random.split(key)
    angle = jax.random.randint(key_k, (num_points,), 0, 8) * (math.pi / 4)
    centres = 8.0 * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    z = jax.random.normal(key_z, (num_points, 2), jnp.float32)
    return (z + centres) / math.sqrt(2.0)


def _spirals2(key: jax.Array, num_points: int) -> jax.Array:
    key_n, key_u, key_s = jax.random.split(key, 3)
    n = jnp.sqrt(jax.random.uniform(key_n, (num_points, 1), jnp.float32)) * (3 * math.pi)
    jitter = jax.random.uniform(key_u, (num_points, 2), jnp.float32) / 2
    arm = jnp.concatenate([-jnp.cos(n) * n, jnp.sin(n) * n], axis=-1) + jitter
    sign = jax.random.rademacher(key_s, (num_points, 1), jnp.float32)
    return (2.3 / 3.0) * sign * arm


def _checkerboard(key: jax.Array, num_points: int) -> jax.Array:
    key_1, key_2, key_b = jax.random.split(key, 3)
    x1 = jax.random.uniform(key_1, (num_points,), jnp.float32, -2.0, 2.0)
    b = jax.random.bernoulli(key_b, 0.5, (num_points,)).astype(jnp.float32)
    x2 = jax.random.uniform(key_2, (num_points,), jnp.float32) - 2 * b + jnp.mod(jnp.floor(x1), 2)
    return 3.0 * jnp.stack([x1, x2], axis=-1)


_GENERATORS = {"gaussians8": _gaussians8, "spirals2": _spirals2, "checkerboard": _checkerboard}
TOY_DATASETS = tuple(_GENERATORS)


def sample_toy(name: str, key: jax.Array, num_points: int) -> jax.Array:
    """num_points i.i.d. points of the toy data set `name`: float32 [num_points, 2]."""
    if name not in _GENERATORS:
        raise ValueError(f"Unknown toy data set {name!r}; valid: {TOY_DATASETS}.")
    return _GENERATORS[name](key, num_points)


def toy_batch(dataset: jax.Array, key: jax.Array, step: int, global_batch_size: int,
              process_index: int = 0, process_count: int = 1) -> jax.Array:
    """This process's slice [global_batch_size // process_count, *S] of batch number `step`.

    The global batch holds dataset rows drawn uniformly with replacement, with indices from
    jax.random.fold_in(key, step): it depends only on (key, step), so resuming at any step
    reproduces the uninterrupted run exactly. Process p gets the p-th contiguous slice, so
    the slices of all processes, concatenated in order, are the one-process batch.
    dataset: [N, *S] (NumPy or JAX).
    """
    if global_batch_size % process_count:
        raise ValueError(f"The global batch size {global_batch_size} must be divisible by "
                         f"the number of processes {process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    local = global_batch_size // process_count
    indices = jax.random.randint(jax.random.fold_in(key, step), (global_batch_size,), 0,
                                 len(dataset))
    mine = indices[process_index * local:(process_index + 1) * local]
    return jnp.take(jnp.asarray(dataset), mine, axis=0)
