"""Evaluation metrics on point sets: the oracle score of a smoothed data set, precision/recall,
density/coverage.

The two metrics are jitted and work through the data in chunks of rows, so memory stays at
O(rows x chunk) however large the sets are. Distances are Euclidean in the data's own units;
matrix products run at full precision on every backend (no TF32 / bfloat16 passes).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def pairwise_sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """Squared Euclidean distances [A, C] between the rows of a [A, D] and b [C, D].

    |a|^2 + |b|^2 - 2 a.b, one matrix product; absolute error about eps (|a|^2 + |b|^2).
    """
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.sum(a * a, axis=-1)[:, None] + jnp.sum(b * b, axis=-1)[None, :] - 2 * cross
    return jnp.maximum(sq, 0.0)


def _chunked(a: jax.Array, chunk: int) -> jax.Array:
    """[N, ...] -> [ceil(N / chunk), chunk, ...], zero-padded at the end."""
    pad = -len(a) % chunk
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(-1, chunk, *a.shape[1:])


def _map_rows(fn: Callable, chunk: int, *arrays: jax.Array) -> jax.Array:
    """fn applied to chunks of rows of arrays (all [N, ...]), results joined to [N, ...]."""
    n = len(arrays[0])
    chunk = min(chunk, n)
    out = jax.lax.map(lambda rows: fn(*rows), tuple(_chunked(a, chunk) for a in arrays))
    return out.reshape(-1, *out.shape[2:])[:n]


@functools.partial(jax.jit, static_argnames="chunk")
def smoothed_empirical_score(x: jax.Array, data: jax.Array, sigma, chunk: int = 2048):
    """Score [B, D] at x [B, D] of the data set data [N, D] convolved with N(0, sigma^2 I).

    score(x) = sum_i w_i (data_i - x) / sigma^2, w = softmax_i(-||x - data_i||^2 / (2 sigma^2)),
    computed with an online (streaming) softmax over chunks of `chunk` data points.
    sigma: scalar or [B], one noise std per row, in the units of x.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
    data = jnp.asarray(data, x.dtype)
    chunk = min(chunk, len(data))
    inv_two_var = 0.5 / jnp.square(sigma)
    valid = _chunked(jnp.ones(len(data), bool), chunk)

    def step(carry, inputs):
        log_max, total, weighted = carry
        points, mask = inputs
        logits = jnp.where(mask, -pairwise_sq_dists(x, points) * inv_two_var[:, None], -jnp.inf)
        new_max = jnp.maximum(log_max, jnp.max(logits, axis=-1))
        decay = jnp.exp(log_max - new_max)
        p = jnp.exp(logits - new_max[:, None])
        weighted = decay[:, None] * weighted + jnp.matmul(
            p, points, precision=jax.lax.Precision.HIGHEST)
        return (new_max, decay * total + jnp.sum(p, axis=-1), weighted), None

    init = (jnp.full(x.shape[:1], -jnp.inf, x.dtype), jnp.zeros(x.shape[:1], x.dtype),
            jnp.zeros_like(x))
    (_, total, weighted), _ = jax.lax.scan(step, init, (_chunked(data, chunk), valid))
    return (weighted / total[:, None] - x) * (2 * inv_two_var)[:, None]


def _kth_neighbour_sq_dist(points: jax.Array, k: int, chunk: int) -> jax.Array:
    """[N]: squared distance from each point [N, D] to its k-th nearest other point."""
    def rows(p, index):
        d = pairwise_sq_dists(p, points)
        d = jnp.where(index[:, None] == jnp.arange(len(points)), jnp.inf, d)
        # min of the k smallest, not [:, k - 1]: XLA turns a sliced top_k into a full sort.
        return -jnp.min(jax.lax.top_k(-d, k)[0], axis=-1)

    return _map_rows(rows, chunk, points, jnp.arange(len(points)))


def _coverage(queries: jax.Array, centres: jax.Array, sq_radii: jax.Array, chunk: int):
    """Fraction of queries [M, D] inside at least one ball (centres [N, D], sq_radii [N])."""
    inside = _map_rows(
        lambda q: jnp.any(pairwise_sq_dists(q, centres) <= sq_radii, axis=-1), chunk, queries)
    return jnp.mean(inside)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def precision_recall(real: jax.Array, fake: jax.Array, k: int = 3, chunk: int = 1024):
    """Improved precision and recall (Kynkaenniemi et al., 2019) of fake [M, D] vs real [N, D].

    Each point's ball has radius the distance to its k-th nearest other point of its own set.
    precision = fraction of fake points inside at least one real ball; recall = fraction of
    real points inside at least one fake ball. Returns two scalars in [0, 1]. Needs N, M > k.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"Both sets need more than k={k} points; got {len(real)} real "
                         f"and {len(fake)} fake.")
    dtype = jnp.promote_types(jnp.result_type(real, fake), jnp.float32)
    real, fake = jnp.asarray(real, dtype), jnp.asarray(fake, dtype)
    precision = _coverage(fake, real, _kth_neighbour_sq_dist(real, k, chunk), chunk)
    recall = _coverage(real, fake, _kth_neighbour_sq_dist(fake, k, chunk), chunk)
    return precision, recall


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def density_coverage(real: jax.Array, fake: jax.Array, k: int = 5, chunk: int = 1024):
    """Density and coverage (Naeem et al., 2020) of fake [M, D] vs real [N, D].

    The balls of the real points as in precision_recall (radius: distance to the k-th
    nearest other real point). density = the number of (fake point, real ball holding it)
    pairs / (k M), 1 on average for fake drawn like real, unbounded above; coverage =
    fraction of real balls that hold at least one fake point. Returns two scalars. Needs
    N > k and M >= 1.
    """
    if len(real) <= k or len(fake) < 1:
        raise ValueError(f"Density and coverage need more than k={k} real points and at "
                         f"least one fake; got {len(real)} real and {len(fake)} fake.")
    dtype = jnp.promote_types(jnp.result_type(real, fake), jnp.float32)
    real, fake = jnp.asarray(real, dtype), jnp.asarray(fake, dtype)
    sq_radii = _kth_neighbour_sq_dist(real, k, chunk)
    balls_holding = _map_rows(
        lambda q: jnp.sum(pairwise_sq_dists(q, real) <= sq_radii, axis=-1), chunk, fake)
    nearest_fake = _map_rows(
        lambda r: jnp.min(pairwise_sq_dists(r, fake), axis=-1), chunk, real)
    density = jnp.sum(balls_holding) / (k * len(fake))
    return density, jnp.mean(nearest_fake <= sq_radii)
