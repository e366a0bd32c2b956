"""Predictor-corrector sampling (Song et al. 2021, Alg. 2).

Shapes: a batch is [B, *data_shape]; score_fn(params, x [B, *], t [B], key) -> [B, *].
Every sample draws its noise from its own key, so a sample does not depend on the batch
it shares or on how the batch is split over devices; nothing mixes samples.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from qcsbm_jax.sde import bcast

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")
PROGRESS_REPORTS = 20


def _per_sample_norm(a: jax.Array) -> jax.Array:
    """[B, *] -> [B] Euclidean norms."""
    return jnp.sqrt(jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim))))


def tweedie_denoise(sde, score: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """E[x_0 | x_t] = (x + std(t)^2 s) / alpha(t), [B, *], given the score s at (x, t).

    This is the noise-free mean of a reverse-diffusion step from t to the clean data
    (std = 0, alpha = 1); for VE it is x + sigma(t)^2 s.
    """
    return (x + bcast(jnp.square(sde.std(t)), x) * score) / bcast(sde.alpha(t), x)


def _predict(predictor: str, sde, score, x, t, dt, z):
    """One predictor step from t to t - dt: x [B, *]. t, dt: [B]; z ~ N(0, I) [B, *]."""
    if predictor == "reverse_diffusion":
        f, g = sde.discretize(x, t, dt)
        mean = x - f + bcast(jnp.square(g), x) * score
    else:  # euler_maruyama
        mean = x - sde.reverse_drift(score, x, t) * bcast(dt, x)
        g = sde.sde(x, t)[1] * jnp.sqrt(dt)
    return mean + bcast(g, x) * z


def _langevin(sde, snr: float, score, x, t, dt, z):
    """One Langevin corrector step at t: x [B, *] (Song et al. 2021, Alg. 4-5).

    Step size 2 a (snr ||z|| / ||s||)^2 with per-sample norms, a = (alpha(t + dt) /
    alpha(t))^2 (the DDPM alpha_i of the interval just stepped over; 1 for VE); zero
    where the score vanishes. The rule relies on ||z|| / ||s|| concentrating, i.e. high
    dimension: on a Gaussian target it inflates the variance by about 1 / (1 - snr^2) for
    large D, by more at moderate D, and many-fold at D = 2 (heavy-tailed 1 / ||s||^2), so
    prefer corrector 'none' (or the ODE sampler) for 2D toy data.
    """
    alpha_ratio = jnp.square(sde.alpha(t + dt) / sde.alpha(t))
    grad_norm = _per_sample_norm(score)
    grad_norm = jnp.where(grad_norm > 0, grad_norm, jnp.inf)
    step = 2 * alpha_ratio * jnp.square(snr * _per_sample_norm(z) / grad_norm)
    return x + bcast(step, x) * score + bcast(jnp.sqrt(2 * step), x) * z


def pc_sample_per_key(params, keys: jax.Array, *, score_fn, sde, shape: tuple[int, ...],
                      num_steps: int, predictor: str = "reverse_diffusion",
                      corrector: str = "langevin", snr: float = 0.16, corrector_steps: int = 1,
                      denoise: bool = True, eps: float = 1e-3,
                      dropout_key: jax.Array | None = None,
                      progress: Callable[[int, int], None] | None = None) -> jax.Array:
    """Predictor-corrector samples [B, *shape], one per key in keys [B].

    Times t_i = T - i (T - eps) / num_steps, i = 0..num_steps. From a prior draw at t_0 = T,
    step i applies the predictor from t_i to t_{i+1} (score at t_i) and then
    corrector_steps corrector steps at t_{i+1}, so the chain ends at t = eps.
    predictor: 'reverse_diffusion' (sde.discretize), 'euler_maruyama' or 'none';
    corrector: 'langevin' (signal-to-noise ratio snr) or 'none'.
    denoise: replace the final sample by tweedie_denoise at eps (one more score call).
    Score evaluations: num_steps (1 + corrector_steps) + denoise (predictor 'none' and
    corrector 'none' skip theirs).
    dropout_key: None calls score_fn with key None (deterministic network); otherwise every
      score evaluation gets its own key folded from it.
    progress: if given, progress(step, num_steps) is called from the device through
      jax.debug.callback after every ceil(num_steps / 20)-th step and after the last one
      (at most 21 calls per run; once per device shard when sharded). For logging only:
      its return value is ignored and calls are not ordered with other host work.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}.")
    if corrector not in CORRECTORS:
        raise ValueError(f"corrector must be one of {CORRECTORS}, got {corrector!r}.")
    batch = keys.shape[0]
    prior_keys, chain_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    times = jnp.linspace(sde.T, eps, num_steps + 1, dtype=jnp.float32)
    every = -(-num_steps // PROGRESS_REPORTS)

    def report(step):
        progress(int(step), num_steps)

    def noise(step, j):
        """Per-sample N(0, I) [B, *shape] for evaluation j of step `step`."""
        return jax.vmap(lambda k: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(k, step), j), shape))(chain_keys)

    def score(x, t, step, j):
        key = (None if dropout_key is None
               else jax.random.fold_in(jax.random.fold_in(dropout_key, step), j))
        return score_fn(params, x, jnp.full((batch,), t), key)

    def body(x, i):
        t, t_next = times[i], times[i + 1]
        dt = jnp.full((batch,), t - t_next)
        if predictor != "none":
            x = _predict(predictor, sde, score(x, t, i, 0), x, jnp.full((batch,), t), dt,
                            noise(i, 0))
        if corrector != "none":
            def correct(j, x):
                return _langevin(sde, snr, score(x, t_next, i, j), x,
                                 jnp.full((batch,), t_next), dt, noise(i, j))
            x = lax.fori_loop(1, corrector_steps + 1, correct, x)
        if progress is not None:
            lax.cond(((i + 1) % every == 0) | (i + 1 == num_steps),
                     lambda: jax.debug.callback(report, i + 1),
                     lambda: None)
        return x, None

    x = jax.vmap(lambda k: sde.prior_sample(k, shape))(prior_keys)
    x, _ = lax.scan(body, x, jnp.arange(num_steps))
    if denoise:
        t = jnp.full((batch,), eps, jnp.float32)
        x = tweedie_denoise(sde, score(x, eps, num_steps, 0), x, t)
    return x


def pc_sample(key: jax.Array, params, *, score_fn, sde, shape: tuple[int, ...], num_steps: int,
              predictor: str = "reverse_diffusion", corrector: str = "langevin",
              snr: float = 0.16, corrector_steps: int = 1, denoise: bool = True,
              eps: float = 1e-3, dropout_key: jax.Array | None = None,
              progress: Callable[[int, int], None] | None = None) -> jax.Array:
    """Predictor-corrector samples [*shape], shape = (B, *data_shape).

    key is split into one key per sample; everything else as in pc_sample_per_key.
    """
    return pc_sample_per_key(
        params, jax.random.split(key, shape[0]), score_fn=score_fn, sde=sde,
        shape=tuple(shape[1:]), num_steps=num_steps, predictor=predictor, corrector=corrector,
        snr=snr, corrector_steps=corrector_steps, denoise=denoise, eps=eps,
        dropout_key=dropout_key, progress=progress)
