"""Evaluation (--mode eval) and sampling (--mode sample) of a trained model.

Toy metrics (PAPER.md, experiment 2), written flat to DIR/eval/metrics.json:
  asym, nasym      exact Jacobian, mean over test points and `eval.num_levels` times
  score_error      1/2 E||s - s*||^2, s* the exact score of the training set convolved
                   with the perturbation kernel, same times
  nll, nll_nfe     -log p(x) in nats by the probability-flow ODE (exact divergence)
  precision,recall k-NN precision/recall of ODE samples against test points
  nfe              mean number of score evaluations per ODE sample
plus per-level values (asym/level_i, ...) and PNGs of the samples and the asymmetry curve.
"""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from qcsbm_jax import (asymmetry, checkpoint, experiment, likelihood, metrics, parallel,
                       plotting, sampling, train)
from qcsbm_jax.data import toy


def evaluation_times(num_levels: int, eps: float = 1e-5) -> np.ndarray:
    """t_i = i / L (1 - eps) + eps for i = 0 .. L-1 (the paper's evaluation grid)."""
    return np.arange(num_levels) / num_levels * (1 - eps) + eps


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   model: experiment.ScoreModel, mesh) -> tuple[Any, int]:
    """The parameters to evaluate (EMA when ema_decay > 0), replicated, and their step."""
    optimizer = train.make_optimizer(config.optim)
    replicated = parallel.replicated(mesh)
    abstract = jax.eval_shape(lambda p: train.init_state(p, optimizer, config.seed),
                              model.init_params)
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
    metadata = {"config": config.to_dict(),
                "signature": experiment.model_signature(config, model.init_params)}
    with checkpoint.Checkpointer(workdir) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoint in {workdir}/checkpoints. Train first with --mode train "
                "(or --mode all), or point --workdir at a trained run.")
        state, saved = ckpt.restore_latest_valid(abstract)
    checkpoint.check_compatible(saved, metadata)
    params = state.ema_params if config.optim.ema_decay > 0 else state.params
    return params, int(state.step)


def _perturb(x0: np.ndarray, t: float, sde, rng: np.random.Generator):
    """Host-side x_t = mean + std z for one time t; returns (x_t, t [N], std)."""
    times = np.full((len(x0),), t, np.float32)
    mean, std = sde.marginal_mean_std(jnp.asarray(x0), jnp.asarray(times))
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    return np.asarray(mean) + np.asarray(std)[:, None] * noise, times, float(std[0])


def toy_metrics(config, model, params, mesh, train_data: np.ndarray,
                test_data: np.ndarray) -> dict[str, float]:
    """Every toy metric of PAPER.md experiment 2 for one set of parameters."""
    ev, sde, score_fn = config.eval, model.sde, model.score_fn
    rng = np.random.default_rng(ev.seed)
    times = evaluation_times(ev.num_levels, ev.eps)

    @jax.jit
    def jacobian_metrics(x, t):
        jac = asymmetry.full_jacobian(lambda y: score_fn(params, y, t), x)[1]
        return asymmetry.asymmetry(jac), asymmetry.normalized_asymmetry(jac)

    @jax.jit
    def score_error(x, t, std):
        oracle = metrics.smoothed_empirical_score(x, sde.alpha(t[0]) * train_data, std)
        return 0.5 * jnp.sum(jnp.square(score_fn(params, x, t) - oracle), axis=-1)

    results: dict[str, float] = {}
    for i, t in enumerate(times):
        x_t, t_rows, _ = _perturb(test_data, t, sde, rng)
        asym, nasym = parallel.map_batches(jacobian_metrics, (x_t, t_rows), ev.batch_size, mesh)
        x_s, t_s, std = _perturb(train_data[:ev.score_error_points], t, sde, rng)
        err = parallel.map_batches(lambda x, tt: score_error(x, tt, std), (x_s, t_s),
                                   ev.batch_size, mesh)
        results.update({f"asym/level_{i}": float(asym.mean()),
                        f"nasym/level_{i}": float(nasym.mean()),
                        f"score_error/level_{i}": float(err.mean())})
    for name in ("asym", "nasym", "score_error"):
        results[name] = float(np.mean([results[f"{name}/level_{i}"] for i in range(len(times))]))

    nll, nll_nfe = log_likelihood(config, model, params, mesh, test_data)
    results.update(nll=float(nll.mean()), nll_nfe=float(nll_nfe.mean()))
    samples, nfe = ode_samples(config, model, params, mesh, ev.num_samples, ev.seed)
    precision, recall = metrics.precision_recall(
        jnp.asarray(test_data[:ev.num_samples]), jnp.asarray(samples), k=ev.pr_k)
    results.update(precision=float(precision), recall=float(recall), nfe=float(nfe.mean()))
    return results, times, samples


def log_likelihood(config, model, params, mesh, data: np.ndarray):
    """Per-example NLL in nats and NFE by the probability-flow ODE, sharded per device."""
    ev = config.eval

    def local(p, x):
        nll, _, nfe = likelihood.ode_log_likelihood(
            jax.random.key(ev.seed), p, x, score_fn=model.score_fn, sde=model.sde,
            divergence=ev.divergence, rtol=ev.rtol, atol=ev.atol, eps=ev.eps)
        return nll, nfe

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=1))
    return parallel.map_batches(lambda x: fn(params, x), (data,), ev.batch_size, mesh,
                                label="likelihood (probability-flow ODE)")


def ode_samples(config, model, params, mesh, num_samples: int, seed: int):
    """num_samples probability-flow ODE samples [N, *S] and their NFE [N]."""
    sc = config.sampling
    prior = np.asarray(model.sde.prior_sample(jax.random.key(seed),
                                              (num_samples, *model.data_shape)))

    def local(p, z):
        return sampling.ode_sample_from_prior(p, z, score_fn=model.score_fn, sde=model.sde,
                                              rtol=sc.rtol, atol=sc.atol, eps=sc.eps)

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=1))
    return parallel.map_batches(lambda z: fn(params, z), (prior,), sc.batch_size, mesh,
                                label="ODE sampling")


def _log_pc_progress(step: int, total: int) -> None:
    logging.info("PC sampling: step %d/%d", step, total)


def pc_samples(config, model, params, mesh, num_samples: int, seed: int) -> np.ndarray:
    """num_samples predictor-corrector samples [N, *S]."""
    sc = config.sampling
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), num_samples)))

    def local(p, key_data):
        keys = jax.random.wrap_key_data(key_data)
        return sampling.pc_sample_per_key(
            p, keys, score_fn=model.score_fn, sde=model.sde, shape=model.data_shape,
            num_steps=sc.num_steps, predictor=sc.predictor, corrector=sc.corrector,
            snr=sc.snr, corrector_steps=sc.corrector_steps, denoise=sc.denoise, eps=sc.eps,
            progress=_log_pc_progress)

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=1))
    return parallel.map_batches(lambda k: fn(params, k), (keys,), sc.batch_size, mesh,
                                label="PC sampling")


def _toy_data(config) -> tuple[np.ndarray, np.ndarray]:
    """The training set (as in train.py) and a fresh test set of eval.num_points."""
    train_data = toy.sample_toy(config.data.name, jax.random.key(config.data.seed),
                                config.data.num_points)
    test_data = toy.sample_toy(config.data.name, jax.random.key(config.eval.seed + 10_000),
                               config.eval.num_points)
    return np.asarray(train_data), np.asarray(test_data)


def _write_json(path: str, values: dict) -> None:
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(values, f, indent=2, sort_keys=True)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Computes the metrics of the newest checkpoint and writes DIR/eval/metrics.json."""
    mesh = parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis)
    model = experiment.build_score_model(config)
    params, step = restore_params(config, workdir, model, mesh)
    train_data, test_data = _toy_data(config)
    results, times, samples = toy_metrics(config, model, params, mesh, train_data, test_data)
    results["step"] = float(step)
    out = os.path.join(workdir, "eval")
    _write_json(os.path.join(out, "metrics.json"), results)
    if jax.process_index() == 0:
        plotting.scatter_png(os.path.join(out, "samples.png"),
                             {"data": test_data[:len(samples)], "samples": samples},
                             title=f"{config.data.name}, step {step}")
        plotting.curves_png(
            os.path.join(out, "asymmetry.png"), times,
            {name: [results[f"{name}/level_{i}"] for i in range(len(times))]
             for name in ("asym", "nasym")},
            xlabel="t", ylabel="value", logy=True, title="Jacobian asymmetry per noise level")
    logging.info("Step %d: %s", step, {k: v for k, v in results.items() if "/" not in k})
    return results


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Draws sampling.num_samples samples; writes DIR/samples/samples.npz and a PNG."""
    mesh = parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis)
    model = experiment.build_score_model(config)
    params, step = restore_params(config, workdir, model, mesh)
    sc = config.sampling
    if sc.method == "ode":
        samples, nfe = ode_samples(config, model, params, mesh, sc.num_samples, config.seed)
        logging.info("ODE sampling: mean NFE %.1f", nfe.mean())
    else:
        samples, nfe = pc_samples(config, model, params, mesh, sc.num_samples, config.seed), None
    out = os.path.join(workdir, "samples")
    path = os.path.join(out, "samples.npz")
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        extra = {} if nfe is None else {"nfe": nfe}
        np.savez(path, samples=samples, step=step, **extra)
        plotting.scatter_png(os.path.join(out, "samples.png"), samples,
                             title=f"{config.data.name} {sc.method} samples, step {step}")
    return path
