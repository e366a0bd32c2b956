"""The jitted, sharded programs behind the metrics: likelihoods and Jacobian asymmetry of
many examples, in batches over a mesh (the samplers' programs are sampling.registry's).

Randomness that belongs to an example (dequantization noise, probes, perturbation noise)
comes from fold_in(key, example index) (qcsbm_jax.streams), so no metric depends on the
batch size or the number of devices (up to rounding), and every checkpoint sees the same
draws (paired comparisons between checkpoints).
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from qcsbm_jax import asymmetry, likelihood, parallel, streams

# Sub-streams of the 'eval' stream of eval.seed.
NLL_STREAM, ASYMMETRY_STREAM, SAMPLES_STREAM = 0, 1, 2


def evaluation_times(num_levels: int, eps: float = 1e-5) -> np.ndarray:
    """t_i = i / L (1 - eps) + eps for i = 0 .. L-1 (the paper's evaluation grid)."""
    return np.arange(num_levels) / num_levels * (1 - eps) + eps


def eval_key(seed: int, stream: int, *path: int) -> jax.Array:
    """The key of one sub-stream of the 'eval' stream of eval.seed."""
    return streams.stream_key(seed, "eval", stream, *path)


def _split_per_example(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two independent typed keys [B] per example from key data [B, ...]."""
    keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(key_data))
    return keys[:, 0], keys[:, 1]


def _rademacher_per_example(keys: jax.Array, like: jax.Array) -> jax.Array:
    """Probes [B, *S] (dtype of like [B, *S]), example b's from keys[b]."""
    return jax.vmap(lambda k: asymmetry.sample_probes(k, like.shape[1:], "rademacher",
                                                      like.dtype))(keys)


def likelihood_inputs(key_data: jax.Array, data: jax.Array, *, divergence: str,
                      dequantize: bool = False, centered: bool = False):
    """(x [B, *S], probes [B, *S] or None for 'exact') of the likelihood of data [B, *S].

    Example b's randomness comes from key_data[b] alone: split in two keys, the first
    dequantizes (dequantize: data are 8-bit images, likelihood.dequantize_images with
    `centered`; otherwise x = data), the second draws its Rademacher probe.
    """
    noise_keys, probe_keys = _split_per_example(key_data)
    x = likelihood.dequantize_images(noise_keys, data, centered) if dequantize else data
    probes = None if divergence == "exact" else _rademacher_per_example(probe_keys, x)
    return x, probes


def nll_program(model, mesh, *, divergence: str, rtol: float, atol: float, eps: float,
                dequantize: bool = False, centered: bool = False) -> Callable:
    """The jitted program behind make_nll_fn: fn(params, data [B, *S], key_data [B, 2])
    -> (nll [B], nfe [B]), the batch split over the mesh."""
    def local(params, data, key_data):
        x, probes = likelihood_inputs(key_data, data, divergence=divergence,
                                      dequantize=dequantize, centered=centered)
        nll, _, nfe = likelihood.ode_log_likelihood(
            params, x, score_fn=model.score_fn, sde=model.sde, divergence=divergence,
            probes=probes, rtol=rtol, atol=atol, eps=eps)
        return nll, nfe

    return jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=2))


def make_nll_fn(model, mesh, *, divergence: str, rtol: float, atol: float, eps: float,
                batch_size: int, dequantize: bool = False, centered: bool = False
                ) -> Callable[[Any, jax.Array, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """nll_fn(params, base_key, data [N, *S]) -> (nll [N] in nats, nfe [N]).

    By the probability-flow ODE (likelihood.ode_log_likelihood), each example solved on
    its own per device shard, from likelihood_inputs with example i's key fold_in(base_key,
    i). With dequantize, data are uint8 images and nll is the density of the dequantized
    model inputs (likelihood.bits_per_dim turns it into bits/dim).
    """
    fn = nll_program(model, mesh, divergence=divergence, rtol=rtol, atol=atol, eps=eps,
                     dequantize=dequantize, centered=centered)

    def nll_fn(params, base_key, data):
        keys = streams.example_keys(base_key, len(data))
        return parallel.map_batches(lambda x, k: fn(params, x, k), (data, keys),
                                    parallel.bucket_size(len(data), batch_size, mesh), mesh,
                                    label="likelihood (probability-flow ODE)")

    return nll_fn


def make_hutchinson_asymmetry_fn(model, mesh, *, batch_size: int, perturb: bool = True
                                 ) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """fn(params, base_key, x [N, *S], t [N] or scalar) -> (asym [N], frob [N]).

    asym and frob are asymmetry.hutchinson_metrics: unbiased one-probe estimates of
    Asym(J) and ||J||_F^2 of the score's Jacobian J, without sigma^2 weight, with one
    Rademacher probe v_i per example from fold_in(base_key, i). perturb: x are clean data
    in the model's range, and example i is evaluated at x_t = alpha(t) x_i + std(t) z_i
    (z_i from the same key); otherwise at (x_i, t) as given. t: SDE times.
    """
    fn = asymmetry_program(model, mesh, perturb=perturb)

    def asymmetry_fn(params, base_key, x, t):
        keys = streams.example_keys(base_key, len(x))
        t = np.broadcast_to(np.asarray(t, np.float32), (len(x),))
        return parallel.map_batches(lambda y, k, tt: fn(params, y, k, tt), (x, keys, t),
                                    parallel.bucket_size(len(x), batch_size, mesh), mesh)

    return asymmetry_fn


def asymmetry_program(model, mesh, *, perturb: bool = True) -> Callable:
    """The jitted program behind make_hutchinson_asymmetry_fn: fn(params, x [B, *S],
    key_data [B, 2], t [B]) -> (asym [B], frob [B]), the batch split over the mesh."""
    sde = model.sde

    def local(params, x, key_data, t):
        noise_keys, probe_keys = _split_per_example(key_data)
        if perturb:
            mean, std = sde.marginal_mean_std(x, t)
            noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(noise_keys)
            x = mean + std.reshape((-1,) + (1,) * (x.ndim - 1)) * noise
        return asymmetry.hutchinson_metrics(lambda y: model.score_fn(params, y, t, None), x,
                                            _rademacher_per_example(probe_keys, x))

    return jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=3))


def make_exact_asymmetry_fn(model, mesh, *, batch_size: int
                            ) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """fn(params, x [N, D], t [N]) -> (Asym [N], NAsym [N]) of the score's exact Jacobian
    at the given (already perturbed) points; small D only (asymmetry.full_jacobian)."""
    @jax.jit
    def jacobian_metrics(params, x, t):
        jac = asymmetry.full_jacobian(lambda y: model.score_fn(params, y, t), x)
        return asymmetry.asymmetry(jac), asymmetry.normalized_asymmetry(jac)

    def asymmetry_fn(params, x, t):
        t = np.broadcast_to(np.asarray(t, np.float32), (len(x),))
        return parallel.map_batches(lambda y, tt: jacobian_metrics(params, y, tt), (x, t),
                                    parallel.bucket_size(len(x), batch_size, mesh), mesh)

    return asymmetry_fn


def with_level_means(results: dict[str, float], names, num_levels: int) -> dict[str, float]:
    """Adds results[name] = mean of results[name/level_i] over i for each name."""
    means = {name: float(np.mean([results[f"{name}/level_{i}"] for i in range(num_levels)]))
             for name in names}
    return {**results, **means}


def asymmetry_summary(per_level: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Metrics from per-level Hutchinson estimates [(asym [N], frob [N]) per level].

    asym/level_i = mean asym; nasym/level_i = mean asym / (2 mean frob); asym and nasym
    are their means over the levels.
    """
    results = {}
    for i, (asym, frob) in enumerate(per_level):
        results[f"asym/level_{i}"] = float(np.mean(asym))
        results[f"nasym/level_{i}"] = float(np.mean(asym) / (2 * np.mean(frob)))
    return with_level_means(results, ("asym", "nasym"), len(per_level))


def finite_rows(solves: str, values, consequence: str) -> np.ndarray:
    """Mask [N] of the rows of values [N, *] without NaN or inf (a failed ODE solve gives a
    NaN row); logs a warning naming the failures and their consequence."""
    values = np.asarray(values)
    finite = np.all(np.isfinite(values.reshape(len(values), -1)), axis=1)
    if not finite.all():
        logging.warning("%d of %d %s ODE solves failed (NaN); %s. Raise the tolerances or "
                        "check the model.", len(finite) - finite.sum(), len(finite), solves,
                        consequence)
    return finite
