"""Evaluation (--mode eval) and sampling (--mode sample) of a trained model.

Toy data (docs/method.md, experiment 2), on eval.num_points fresh points:
  asym, nasym      exact Jacobian, per point; means over test points and then over the
                   `eval.num_levels` times
  score_error      1/2 E||s - s*||^2, s* the exact score of the training set convolved
                   with the perturbation kernel, same times
  nll, nll_nfe     -log p(x) in nats by the probability-flow ODE (eval.divergence)
  precision,recall k-NN precision/recall of ODE samples against test points
  nfe              mean number of score evaluations per ODE sample
  failed_samples   ODE samples that failed (NaN rows, left out of precision/recall)
A failed ODE solve (NaN) is logged as a warning; a failed likelihood solve makes nll NaN.

Image data (experiment 3), on the test split (its first eval.num_test images; 0 = all):
  bpd              bits/dim of the uniformly dequantized images, by the probability-flow
                   ODE (eval.divergence, 'hutchinson': one Rademacher probe per image)
  nll, nll_nfe     the same in nats (density of the model's inputs) and its NFE
  asym, nasym      one-probe Hutchinson estimates (one Rademacher probe and one noise draw
                   per test image and level, no sigma^2 weight) at eval.num_levels times;
                   per level the test-set mean of Asym and mean Asym / (2 mean ||J||_F^2)
                   (a ratio of unbiased means), then the mean over levels
  nfe              mean NFE of the eval.num_samples samples (sampling.method 'ode' only)
Both: per-level values asym/level_i, nasym/level_i, and `step`.

Randomness that belongs to an example (dequantization noise, probes, perturbation noise)
comes from fold_in(stream key, example index), so no metric depends on the batch size or
the number of devices (up to rounding), and every checkpoint sees the same draws (paired
comparisons between checkpoints).

Outputs in DIR/eval for an evaluated step S: asymmetry_S.png (per-level curves against
t / T, log scale), samples_S.png (toy: scatter beside test points; images: a grid of the
first GRID_IMAGES), samples_S.npz, each also copied to its name without _S (the latest);
then metrics_S.json, which marks S as done, and metrics.json; TensorBoard scalars of the
summary metrics in DIR/eval.

Watching (eval.watch): evaluates each new checkpoint as training writes it, waiting with
orbax's checkpoints_iterator (process 0 looks, all processes get the step), until the
step training.num_steps. Each step is read from a snapshot orbax copies to
DIR/eval/snapshot/checkpoints, so the trainer may delete it meanwhile. A step written while
another is being evaluated is skipped when a newer one exists (the newest is taken).
Steps that already have metrics_S.json are skipped, so a killed evaluator just reruns.
eval.watch_timeout > 0 ends the watch after that many seconds without a new checkpoint.
"""

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_utils

from qcsbm_jax import (asymmetry, checkpoint, experiment, likelihood, metrics, parallel,
                       plotting, sampling)
from qcsbm_jax.data import images, toy

EVAL_DIR = "eval"
SNAPSHOT_DIR = "snapshot"  # Under EVAL_DIR; holds a checkpoints/ directory of snapshots.
GRID_IMAGES = 64  # Samples shown in a sample-grid PNG.
# Streams of per-example randomness: fold_in(key(eval.seed), stream).
NLL_STREAM, ASYMMETRY_STREAM = 0, 1


class Evaluation(NamedTuple):
    """What evaluating one set of parameters gives."""
    metrics: dict[str, float]
    level_times: np.ndarray  # [L] t / T of the per-level metrics
    samples: np.ndarray  # [M, *data_shape], M >= 0
    reference: np.ndarray | None  # toy test points drawn beside the samples


def evaluation_times(num_levels: int, eps: float = 1e-5) -> np.ndarray:
    """t_i = i / L (1 - eps) + eps for i = 0 .. L-1 (the paper's evaluation grid)."""
    return np.arange(num_levels) / num_levels * (1 - eps) + eps


def stream_key(seed: int, *path: int) -> jax.Array:
    """fold_in(... fold_in(key(seed), path[0]) ..., path[-1])."""
    key = jax.random.key(seed)
    for index in path:
        key = jax.random.fold_in(key, index)
    return key


def example_keys(base: jax.Array, count: int) -> np.ndarray:
    """Key data [count, ...] (uint32) of fold_in(base, i) for examples i = 0 .. count-1."""
    indices = jnp.arange(count, dtype=jnp.uint32)
    return np.asarray(jax.random.key_data(
        jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, indices)))


def chunk_size(batch_size: int, count: int, mesh) -> int:
    """The batch for count examples: batch_size, or less when a smaller multiple of the
    device count holds them all (no padding to a large configured batch)."""
    return min(batch_size, max(1, -(-count // mesh.size)) * mesh.size)


def _split_per_example(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two independent typed keys [B] per example from key data [B, ...]."""
    keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(key_data))
    return keys[:, 0], keys[:, 1]


def _rademacher_per_example(keys: jax.Array, like: jax.Array) -> jax.Array:
    """Probes [B, *S] (dtype of like [B, *S]), example b's from keys[b]."""
    return jax.vmap(lambda k: asymmetry.sample_probes(k, like.shape[1:], "rademacher",
                                                      like.dtype))(keys)


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   model: experiment.ScoreModel, mesh, step: int | None = None
                   ) -> tuple[Any, int]:
    """The parameters to evaluate (EMA when ema_decay > 0), replicated, and their step.

    step None: the newest readable checkpoint in workdir/checkpoints; otherwise that step.
    Only the parameters and the step are read, so the optimizer settings (schedule,
    clipping) may differ from training's.
    """
    replicated = parallel.replicated(mesh)
    params = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(np.shape(p), np.asarray(p).dtype, sharding=replicated),
        model.init_params)
    which = "ema_params" if config.optim.ema_decay > 0 else "params"
    target = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated), which: params}
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoint in {workdir}/checkpoints. Train first with --mode train "
                "(or --mode all), or point --workdir at a trained run.")
        restored, saved = (ckpt.restore(target, step) if step is not None
                           else ckpt.restore_latest_valid(target))
    checkpoint.check_compatible(
        saved, {"signature": experiment.model_signature(config, model.init_params)},
        advice="Evaluate with the config the run was trained with, or point --workdir at a "
               "run of this model (same network, family and data).")
    return restored[which], int(restored["step"])


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


def make_nll_fn(config, model, mesh, *, dequantize: bool = False, centered: bool = False
                ) -> Callable[[Any, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """nll_fn(params, data [N, *S]) -> (nll [N] in nats, nfe [N]) for every example.

    By the probability-flow ODE (eval.divergence, eval.rtol/atol/eps), each example solved
    on its own per device shard, from likelihood_inputs with example i's key data
    example_keys(stream_key(eval.seed, NLL_STREAM), N)[i]. With dequantize, nll is the
    density of the dequantized images.
    """
    ev = config.eval

    def local(params, data, key_data):
        x, probes = likelihood_inputs(key_data, data, divergence=ev.divergence,
                                      dequantize=dequantize, centered=centered)
        nll, _, nfe = likelihood.ode_log_likelihood(
            params, x, score_fn=model.score_fn, sde=model.sde, divergence=ev.divergence,
            probes=probes, rtol=ev.rtol, atol=ev.atol, eps=ev.eps)
        return nll, nfe

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=2))

    def nll_fn(params, data):
        keys = example_keys(stream_key(ev.seed, NLL_STREAM), len(data))
        return parallel.map_batches(lambda x, k: fn(params, x, k), (data, keys),
                                    chunk_size(ev.batch_size, len(data), mesh), mesh,
                                    label="likelihood (probability-flow ODE)")

    return nll_fn


def make_asymmetry_fn(config, model, mesh
                      ) -> Callable[[Any, np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """level_fn(params, x0 [N, *S], level) -> (asym [N], frob [N]) at t = times[level].

    Example i is perturbed to x_t = alpha(t) x0_i + std(t) z_i and probed with one
    Rademacher v_i (both from fold_in(stream_key(eval.seed, ASYMMETRY_STREAM, level), i));
    asym and frob are asymmetry.hutchinson_metrics: unbiased one-probe estimates of
    Asym(J) and ||J||_F^2 of the score's Jacobian J at (x_t, t), without sigma^2 weight.
    """
    ev, sde = config.eval, model.sde
    times = evaluation_times(ev.num_levels, ev.eps)

    def local(params, x0, key_data, t):
        noise_keys, probe_keys = _split_per_example(key_data)
        mean, std = sde.marginal_mean_std(x0, t)
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(noise_keys)
        x_t = mean + std.reshape((-1,) + (1,) * (x0.ndim - 1)) * noise
        return asymmetry.hutchinson_metrics(lambda y: model.score_fn(params, y, t, None), x_t,
                                            _rademacher_per_example(probe_keys, x0))

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=3))

    def level_fn(params, x0, level):
        keys = example_keys(stream_key(ev.seed, ASYMMETRY_STREAM, level), len(x0))
        t = np.full((len(x0),), times[level], np.float32)
        return parallel.map_batches(lambda x, k, tt: fn(params, x, k, tt), (x0, keys, t),
                                    chunk_size(ev.batch_size, len(x0), mesh), mesh)

    return level_fn


def asymmetry_summary(per_level: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Metrics from per-level Hutchinson estimates [(asym [N], frob [N]) per level].

    asym/level_i = mean asym; nasym/level_i = mean asym / (2 mean frob); asym and nasym
    are their means over the levels.
    """
    results = {}
    for i, (asym, frob) in enumerate(per_level):
        results[f"asym/level_{i}"] = float(np.mean(asym))
        results[f"nasym/level_{i}"] = float(np.mean(asym) / (2 * np.mean(frob)))
    return _with_level_means(results, ("asym", "nasym"), len(per_level))


def _with_level_means(results: dict[str, float], names, num_levels: int) -> dict[str, float]:
    """Adds results[name] = mean of results[name/level_i] over i for each name."""
    means = {name: float(np.mean([results[f"{name}/level_{i}"] for i in range(num_levels)]))
             for name in names}
    return {**results, **means}


def make_ode_sampler(config, model, mesh) -> Callable[[Any, int, int], tuple]:
    """sample_fn(params, num_samples, seed) -> (samples [N, *S], nfe [N]): probability-flow
    ODE samples (sampling.rtol/atol/eps) from prior draws made with key(seed)."""
    sc = config.sampling

    def local(p, z):
        return sampling.ode_sample_from_prior(p, z, score_fn=model.score_fn, sde=model.sde,
                                              rtol=sc.rtol, atol=sc.atol, eps=sc.eps)

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=1))

    def sample_fn(params, num_samples, seed):
        prior = np.asarray(model.sde.prior_sample(jax.random.key(seed),
                                                  (num_samples, *model.data_shape)))
        return parallel.map_batches(lambda z: fn(params, z), (prior,),
                                    chunk_size(sc.batch_size, num_samples, mesh), mesh,
                                    label="ODE sampling")

    return sample_fn


def _log_pc_progress(step: int, total: int) -> None:
    logging.info("PC sampling: step %d/%d", step, total)


def make_pc_sampler(config, model, mesh) -> Callable[[Any, int, int], tuple]:
    """sample_fn(params, num_samples, seed) -> (samples [N, *S], None): predictor-corrector
    samples (config.sampling), sample i from the i-th key of split(key(seed), N)."""
    sc = config.sampling

    def local(p, key_data):
        return sampling.pc_sample_per_key(
            p, jax.random.wrap_key_data(key_data), score_fn=model.score_fn, sde=model.sde,
            shape=model.data_shape, num_steps=sc.num_steps, predictor=sc.predictor,
            corrector=sc.corrector, snr=sc.snr, corrector_steps=sc.corrector_steps,
            denoise=sc.denoise, eps=sc.eps, progress=_log_pc_progress)

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=1))

    def sample_fn(params, num_samples, seed):
        keys = np.asarray(jax.random.key_data(
            jax.random.split(jax.random.key(seed), num_samples)))
        samples = parallel.map_batches(lambda k: fn(params, k), (keys,),
                                       chunk_size(sc.batch_size, num_samples, mesh), mesh,
                                       label="PC sampling")
        return samples, None

    return sample_fn


def make_sampler(config, model, mesh) -> Callable[[Any, int, int], tuple]:
    """The sampler of config.sampling.method: 'ode' (with NFE) or 'pc' (NFE None)."""
    if config.sampling.method == "ode":
        return make_ode_sampler(config, model, mesh)
    return make_pc_sampler(config, model, mesh)


def _toy_data(config) -> tuple[np.ndarray, np.ndarray]:
    """The training set (as in train.py) and a fresh test set of eval.num_points."""
    train_data = toy.sample_toy(config.data.name, jax.random.key(config.data.seed),
                                config.data.num_points)
    test_data = toy.sample_toy(config.data.name, jax.random.key(config.eval.seed + 10_000),
                               config.eval.num_points)
    return np.asarray(train_data), np.asarray(test_data)


def _perturb(x0: np.ndarray, t: float, sde, rng: np.random.Generator):
    """Host-side x_t = mean + std z for one time t; returns (x_t, t [N], std)."""
    times = np.full((len(x0),), t, np.float32)
    mean, std = sde.marginal_mean_std(jnp.asarray(x0), jnp.asarray(times))
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    return np.asarray(mean) + np.asarray(std)[:, None] * noise, times, float(std[0])


def _finite_rows(solves: str, values, consequence: str) -> np.ndarray:
    """Mask [N] of the rows of values [N, *] without NaN or inf (a failed ODE solve gives a
    NaN row); logs a warning naming the failures and their consequence."""
    values = np.asarray(values)
    finite = np.all(np.isfinite(values.reshape(len(values), -1)), axis=1)
    if not finite.all():
        logging.warning("%d of %d %s ODE solves failed (NaN); %s. Raise eval.rtol/atol or "
                        "check the model.", len(finite) - finite.sum(), len(finite), solves,
                        consequence)
    return finite


def make_toy_evaluator(config, model, mesh) -> Callable[[Any], Evaluation]:
    """evaluate_params(params) -> Evaluation with every toy metric of experiment 2."""
    ev, sde, score_fn = config.eval, model.sde, model.score_fn
    train_data, test_data = _toy_data(config)
    times = evaluation_times(ev.num_levels, ev.eps)
    nll_fn = make_nll_fn(config, model, mesh)
    sample_fn = make_ode_sampler(config, model, mesh)

    @jax.jit
    def jacobian_metrics(params, x, t):
        jac = asymmetry.full_jacobian(lambda y: score_fn(params, y, t), x)[1]
        return asymmetry.asymmetry(jac), asymmetry.normalized_asymmetry(jac)

    @jax.jit
    def score_error(params, x, t, std):
        oracle = metrics.smoothed_empirical_score(x, sde.alpha(t[0]) * train_data, std)
        return 0.5 * jnp.sum(jnp.square(score_fn(params, x, t) - oracle), axis=-1)

    def evaluate_params(params) -> Evaluation:
        rng = np.random.default_rng(ev.seed)
        results: dict[str, float] = {}
        for i, t in enumerate(times):
            x_t, t_rows, _ = _perturb(test_data, t, sde, rng)
            asym, nasym = parallel.map_batches(lambda x, tt: jacobian_metrics(params, x, tt),
                                               (x_t, t_rows), ev.batch_size, mesh)
            x_s, t_s, std = _perturb(train_data[:ev.score_error_points], t, sde, rng)
            err = parallel.map_batches(lambda x, tt: score_error(params, x, tt, std),
                                       (x_s, t_s), ev.batch_size, mesh)
            results.update({f"asym/level_{i}": float(asym.mean()),
                            f"nasym/level_{i}": float(nasym.mean()),
                            f"score_error/level_{i}": float(err.mean())})
        results = _with_level_means(results, ("asym", "nasym", "score_error"), len(times))
        nll, nll_nfe = nll_fn(params, test_data)
        _finite_rows("likelihood", nll, "nll is NaN")
        results.update(nll=float(nll.mean()), nll_nfe=float(nll_nfe.mean()))
        samples, nfe = sample_fn(params, ev.num_samples, ev.seed)
        finite = _finite_rows("sampling", samples, "precision and recall use the others")
        precision = recall = float("nan")
        if finite.sum() > ev.pr_k:
            precision, recall = metrics.precision_recall(
                jnp.asarray(test_data[:ev.num_samples]), jnp.asarray(samples[finite]),
                k=ev.pr_k)
        results.update(precision=float(precision), recall=float(recall), nfe=float(nfe.mean()),
                       failed_samples=float(len(samples) - finite.sum()))
        return Evaluation(results, times / sde.T, samples, test_data[:len(samples)])

    return evaluate_params


def load_test_images(config, data_shape: tuple[int, ...]) -> np.ndarray:
    """The first eval.num_test (0: all) test images, uint8 [N, *data_shape], the same on
    every process."""
    test = images.load_split(config.data.name, "test", data_dir=config.data.data_dir or None,
                             fashion_mnist_dir=config.data.fashion_mnist_dir,
                             process_index=0, process_count=1)
    if config.eval.num_test:
        test = test[:config.eval.num_test]
    if tuple(test.shape[1:]) != tuple(data_shape):
        raise ValueError(f"The {config.data.name} test images have shape {test.shape[1:]}, "
                         f"but the model takes {tuple(data_shape)}; check data.name and the "
                         "model config.")
    return test


def make_image_evaluator(config, model, mesh) -> Callable[[Any], Evaluation]:
    """evaluate_params(params) -> Evaluation with the image metrics (module doc)."""
    ev, centered = config.eval, config.data.centered
    if ev.divergence != "hutchinson":  # config.validate refuses it earlier on the CLI.
        raise ValueError(f"--config.eval.divergence={ev.divergence!r} needs one jvp per pixel "
                         "per ODE step; use 'hutchinson' for images.")
    test_uint8 = load_test_images(config, model.data_shape)
    test_float = np.asarray(images.to_float(test_uint8, centered), np.float32)
    dims = int(np.prod(model.data_shape))
    times = evaluation_times(ev.num_levels, ev.eps)
    nll_fn = make_nll_fn(config, model, mesh, dequantize=True, centered=centered)
    level_fn = make_asymmetry_fn(config, model, mesh)
    sample_fn = make_sampler(config, model, mesh)

    def evaluate_params(params) -> Evaluation:
        nll, nll_nfe = nll_fn(params, test_uint8)
        _finite_rows("likelihood", nll, "bpd is NaN")
        bpd = likelihood.bits_per_dim(nll, dims, data_scale=likelihood.image_data_scale(centered))
        results = {"bpd": float(np.mean(bpd)), "nll": float(np.mean(nll)),
                   "nll_nfe": float(np.mean(nll_nfe))}
        per_level = []
        for level, t in enumerate(times):
            per_level.append(level_fn(params, test_float, level))
            logging.info("Asymmetry level %d/%d (t = %.5f): mean Asym %.4g", level + 1,
                         len(times), t, np.mean(per_level[-1][0]))
        if per_level:
            results.update(asymmetry_summary(per_level))
        samples = np.zeros((0, *model.data_shape), np.float32)
        if ev.num_samples:
            samples, nfe = sample_fn(params, ev.num_samples, ev.seed)
            if nfe is not None:
                results["nfe"] = float(np.mean(nfe))
        return Evaluation(results, times / model.sde.T, samples, None)

    return evaluate_params


def data_kind(config) -> str:
    """'toy' or 'image', from config.data.name; a clear error for anything else."""
    if config.data.name in toy.TOY_DATASETS:
        return "toy"
    if config.data.name in images.IMAGE_DATASETS:
        return "image"
    raise ValueError(f"Unknown data.name {config.data.name!r}; valid: "
                     f"{tuple(toy.TOY_DATASETS) + tuple(images.IMAGE_DATASETS)}.")


def make_evaluator(config, model, mesh) -> Callable[[Any], Evaluation]:
    """The evaluator of the config's data set (toy or image); jitted once, reusable."""
    if data_kind(config) == "toy":
        return make_toy_evaluator(config, model, mesh)
    return make_image_evaluator(config, model, mesh)


def _value_range(config) -> tuple[float, float]:
    """The range of image values in model space."""
    return (-1.0, 1.0) if config.data.centered else (0.0, 1.0)


def _write_json(path: str, values: dict) -> None:
    """Writes JSON through a temporary file, so a killed writer leaves no partial file."""
    temporary = epath.Path(path + ".tmp")
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True))
    temporary.replace(path)


def _write_samples(config, directory: str, name: str, samples: np.ndarray, step: int,
                   nfe: np.ndarray | None = None, reference: np.ndarray | None = None
                   ) -> list[str]:
    """Writes name.npz (samples, step, nfe if any; uint8 `images` for image data) and
    name.png (toy: scatter beside `reference`; images: a grid of the first GRID_IMAGES).
    Returns the file names."""
    extra = {} if nfe is None else {"nfe": nfe}
    png = os.path.join(directory, name + ".png")
    title = f"{config.data.name}, step {step}"
    if data_kind(config) == "toy":
        plotting.scatter_png(png, samples if reference is None
                             else {"data": reference, "samples": samples}, title=title)
    else:
        extra["images"] = plotting.to_pixels(samples, _value_range(config))
        plotting.image_grid_png(png, samples[:GRID_IMAGES], value_range=_value_range(config))
    with epath.Path(directory, name + ".npz").open("wb") as f:
        np.savez(f, samples=samples, step=step, **extra)
    return [name + ".png", name + ".npz"]


def write_evaluation(config, workdir: str, step: int, evaluation: Evaluation) -> dict:
    """Writes DIR/eval/*_<step> files and their latest copies (module doc); the metrics."""
    results = dict(evaluation.metrics, step=float(step))
    if jax.process_index() != 0:
        return results
    out = os.path.join(workdir, EVAL_DIR)
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    names = []
    num_levels = len(evaluation.level_times)
    if num_levels:
        names.append(f"asymmetry_{step}.png")
        plotting.curves_png(
            os.path.join(out, names[-1]), evaluation.level_times,
            {name: [results[f"{name}/level_{i}"] for i in range(num_levels)]
             for name in ("asym", "nasym")},
            xlabel="t / T", ylabel="value", logy=True,
            title=f"Jacobian asymmetry per noise level, step {step}")
    if len(evaluation.samples):
        names += _write_samples(config, out, f"samples_{step}", evaluation.samples, step,
                                reference=evaluation.reference)
    for name in names:
        epath.Path(out, name).copy(epath.Path(out, name.replace(f"_{step}.", ".")),
                                   overwrite=True)
    _write_json(os.path.join(out, f"metrics_{step}.json"), results)
    _write_json(os.path.join(out, "metrics.json"), results)
    return results


def _evaluated(workdir: str, step: int) -> bool:
    """Whether DIR/eval/metrics_<step>.json exists (the same answer on every process)."""
    done = epath.Path(workdir, EVAL_DIR, f"metrics_{step}.json").exists()
    return bool(multihost_utils.broadcast_one_to_all(np.int32(done)))


def _evaluate_step(config, workdir, evaluator, params, step, writer) -> dict:
    """Evaluates params of `step`, writes the files and the summary scalars; the metrics."""
    results = write_evaluation(config, workdir, step, evaluator(params))
    summary = {k: v for k, v in results.items() if "/" not in k and k != "step"}
    writer.write_scalars(step, summary)
    writer.flush()
    logging.info("Step %d: %s", step, summary)
    return results


def _watch(config, workdir, model, mesh, evaluator, writer) -> dict:
    """Evaluates checkpoints as they appear until training.num_steps (module doc)."""
    final = config.training.num_steps
    timeout = config.eval.watch_timeout or None
    snapshot_root = os.path.join(workdir, EVAL_DIR, SNAPSHOT_DIR)
    steps = checkpoint_utils.checkpoints_iterator(
        os.path.join(workdir, "checkpoints"), timeout=timeout,
        snapshot_dir=epath.Path(snapshot_root) / "checkpoints")
    results, step = {}, None
    with contextlib.closing(steps):
        for step in steps:
            if _evaluated(workdir, step):
                logging.info("Step %d was evaluated before; skipped.", step)
            else:
                try:
                    params, _ = restore_params(config, snapshot_root, model, mesh, step)
                except checkpoint.CorruptCheckpointError as e:
                    logging.warning("%s Skipped.", e)
                else:
                    results = _evaluate_step(config, workdir, evaluator, params, step, writer)
            if step >= final:
                return results
    logging.warning("No new checkpoint for %s s after step %s; stopped watching before "
                    "step %d (training.num_steps).", timeout, step, final)
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluates the newest checkpoint, or with eval.watch every new one until
    training.num_steps; writes DIR/eval (module doc). Returns the last metrics computed
    ({} when watching found only evaluated steps)."""
    mesh = parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis)
    model = experiment.build_score_model(config)
    watch = config.eval.watch
    if not watch:
        params, step = restore_params(config, workdir, model, mesh)
    evaluator = make_evaluator(config, model, mesh)
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, EVAL_DIR), just_logging=jax.process_index() > 0)
    try:
        if watch:
            return _watch(config, workdir, model, mesh, evaluator, writer)
        return _evaluate_step(config, workdir, evaluator, params, step, writer)
    finally:
        writer.close()


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Draws sampling.num_samples samples of the newest checkpoint with sampling.method;
    writes DIR/samples/samples.npz (samples, step, nfe for 'ode', uint8 images for image
    data) and samples.png. Returns the npz path."""
    mesh = parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis)
    model = experiment.build_score_model(config)
    params, step = restore_params(config, workdir, model, mesh)
    sc = config.sampling
    samples, nfe = make_sampler(config, model, mesh)(params, sc.num_samples, config.seed)
    if nfe is not None:
        logging.info("ODE sampling: mean NFE %.1f", nfe.mean())
    out = os.path.join(workdir, "samples")
    if jax.process_index() == 0:
        epath.Path(out).mkdir(parents=True, exist_ok=True)
        _write_samples(config, out, "samples", samples, step, nfe=nfe)
    return os.path.join(out, "samples.npz")
