"""Evaluation of a 2D toy model (docs/method.md, experiment 2), on eval.num_points fresh
test points:

  asym, nasym      exact Jacobian, per point; means over test points and then over the
                   eval.num_levels times
  score_error      1/2 E||s - s*||^2, s* the exact score of the training set convolved
                   with the perturbation kernel, same times
  nll, nll_nfe     -log p(x) in nats by the probability-flow ODE (eval.divergence)
  precision,recall k-NN precision/recall of ODE samples against test points
  nfe              mean number of score evaluations per ODE sample
  failed_samples   ODE samples that failed (NaN rows, left out of precision/recall)
Per-level values asym/level_i, nasym/level_i, score_error/level_i. A failed ODE solve
(NaN) is logged as a warning; a failed likelihood solve makes nll NaN.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qcsbm_jax import data, metrics, parallel
from qcsbm_jax.evaluation import programs
from qcsbm_jax.evaluation.outputs import Evaluation
from qcsbm_jax.sampling import registry


def _perturb(x0: np.ndarray, t: float, sde, rng: np.random.Generator):
    """Host-side x_t = mean + std z for one time t; returns (x_t, t [N], std)."""
    times = np.full((len(x0),), t, np.float32)
    mean, std = sde.marginal_mean_std(jnp.asarray(x0), jnp.asarray(times))
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    return np.asarray(mean) + np.asarray(std)[:, None] * noise, times, float(std[0])


def make_toy_evaluator(config, model, mesh) -> Callable[[Any], Evaluation]:
    """evaluate_params(params) -> Evaluation with every toy metric (module doc)."""
    ev, sde, score_fn = config.eval, model.sde, model.score_fn
    train_data, test_data = data.toy_training_set(config), data.toy_test_set(config)
    times = programs.evaluation_times(ev.num_levels, ev.eps)
    nll_fn = programs.make_nll_fn(model, mesh, divergence=ev.divergence, rtol=ev.rtol,
                                  atol=ev.atol, eps=ev.eps, batch_size=ev.batch_size)
    asymmetry_fn = programs.make_exact_asymmetry_fn(model, mesh, batch_size=ev.batch_size)
    sample_fn = registry.make_config_sampler(config.sampling, model, mesh, "ode")

    @jax.jit
    def score_error(params, x, t, std):
        oracle = metrics.smoothed_empirical_score(x, sde.alpha(t[0]) * train_data, std)
        return 0.5 * jnp.sum(jnp.square(score_fn(params, x, t) - oracle), axis=-1)

    def evaluate_params(params) -> Evaluation:
        rng = np.random.default_rng(ev.seed)
        results: dict[str, float] = {}
        for i, t in enumerate(times):
            x_t, _, _ = _perturb(test_data, t, sde, rng)
            asym, nasym = asymmetry_fn(params, x_t, t)
            x_s, t_s, std = _perturb(train_data[:ev.score_error_points], t, sde, rng)
            err = parallel.map_batches(lambda x, tt: score_error(params, x, tt, std),
                                       (x_s, t_s), ev.batch_size, mesh)
            results.update({f"asym/level_{i}": float(asym.mean()),
                            f"nasym/level_{i}": float(nasym.mean()),
                            f"score_error/level_{i}": float(err.mean())})
        results = programs.with_level_means(results, ("asym", "nasym", "score_error"),
                                            len(times))
        nll, nll_nfe = nll_fn(params, programs.eval_key(ev.seed, programs.NLL_STREAM),
                              test_data)
        programs.finite_rows("likelihood", nll, "nll is NaN")
        results.update(nll=float(nll.mean()), nll_nfe=float(nll_nfe.mean()))
        samples, nfe = sample_fn(params, programs.eval_key(ev.seed, programs.SAMPLES_STREAM),
                                 ev.num_samples)
        finite = programs.finite_rows("sampling", samples,
                                      "precision and recall use the others")
        precision = recall = float("nan")
        if finite.sum() > ev.pr_k:
            precision, recall = metrics.precision_recall(
                jnp.asarray(test_data[:ev.num_samples]), jnp.asarray(samples[finite]),
                k=ev.pr_k)
        results.update(precision=float(precision), recall=float(recall), nfe=float(nfe.mean()),
                       failed_samples=float(len(samples) - finite.sum()))
        return Evaluation(results, times / sde.T, samples, test_data[:len(samples)])

    return evaluate_params
