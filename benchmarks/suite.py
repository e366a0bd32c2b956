"""Timings of every hot path of qcsbm_jax, printed as tables and returned as JSON rows.

Sections (docs/benchmarks.md explains every column):
  train       one jitted train step (train.make_train_step: loss, gradient, Adam, EMA) for
              DSM alone and DSM + QC variants (VARIANTS), timed side by side: every round
              runs each variant in turn on one shared state, so load changes on a shared
              machine hit all variants alike and the ratio to DSM stays meaningful.
  score       one score-network evaluation, the unit cost of the samplers.
  pc          predictor-corrector sampling steps per second.
  ode         probability-flow ODE sampling: NFE per sample and time.
  likelihood  NLL (bits/dim for images) by the probability-flow ODE: time per 1000 examples.
  gradnoise   probe noise of the penalty's parameter gradient for each loss.qc_gradient.
  accuracy    bfloat16 against float32 for the QC penalty estimate on fields of known
              asymmetry, next to the estimate's own probe noise.
Peak memory is XLA's per-device estimate for the compiled step (arguments + outputs +
temporaries, less donated buffers), plus the device's own peak where it reports one
(GPU / TPU memory_stats). Networks are freshly initialised and image data are uniform
noise: timings do not depend on training, ODE NFE does (trained models need other NFE).
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qcsbm_jax import (asymmetry, config as config_lib, experiment, likelihood, losses, models,
                       parallel, sampling, score, train)
from qcsbm_jax.data import toy
from qcsbm_jax.sde import bcast

# Train-step variants: make_loss_fn options on top of the model's qc_weight (None: DSM).
VARIANTS = {
    "dsm": None,
    "qc_nonneg": dict(estimator="nonneg"),
    "qc_jvp_vjp": dict(estimator="jvp_vjp"),
    "qc_two_vjp": dict(estimator="two_vjp"),
    "qc_nonneg_separate": dict(estimator="nonneg", jacobian_method="separate"),
    "qc_nonneg_jvpgrad": dict(estimator="nonneg", qc_gradient="jvp"),
    "qc_nonneg_frac25": dict(estimator="nonneg", qc_fraction=0.25),
    "qc_nonneg_every4": dict(estimator="nonneg", qc_every=4),
    "qc_nonneg_remat": dict(estimator="nonneg", remat="dots"),
    "qc_exact": dict(estimator="exact"),
}
IMAGE_VARIANTS = tuple(v for v in VARIANTS if v != "qc_exact")
ASYMMETRY_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4)  # NAsym of the fields in the accuracy section


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch sizes and lengths of one run tier of a model."""
    train_batches: tuple[int, ...]
    sample_batch: int
    pc_steps: int
    accuracy_batch: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its config, penalty weight, variants and sizes per tier
    ('quick': --quick; 'cpu' and 'accelerator': full runs on that backend)."""
    config: Callable[[], ml_collections.ConfigDict]
    qc_weight: float
    variants: tuple[str, ...]
    sizes: dict[str, Sizes]


MODELS = {
    "toy": ModelSpec(
        lambda: config_lib.toy_config("checkerboard", "usbm"), 0.1, tuple(VARIANTS),
        dict(quick=Sizes((256,), 256, 20, 64), cpu=Sizes((5000,), 5000, 1000, 2000),
             accelerator=Sizes((5000,), 5000, 1000, 2000))),
    "ncsnpp_smoke": ModelSpec(
        lambda: config_lib.image_config("cifar10", "usbm", "smoke"), 1e-4, IMAGE_VARIANTS,
        dict(quick=Sizes((8,), 8, 2, 4), cpu=Sizes((8,), 8, 20, 4),
             accelerator=Sizes((128,), 128, 100, 16))),
    "ncsnpp_small": ModelSpec(
        lambda: config_lib.image_config("cifar10", "usbm", "small"), 1e-4, IMAGE_VARIANTS,
        dict(quick=Sizes((8,), 8, 2, 4), cpu=Sizes((64,), 16, 20, 16),
             accelerator=Sizes((128,), 128, 100, 16))),
    "ncsnpp_deep": ModelSpec(
        lambda: config_lib.image_config("cifar10", "usbm"), 1e-4,
        ("dsm", "qc_nonneg", "qc_nonneg_jvpgrad", "qc_jvp_vjp", "qc_two_vjp",
         "qc_nonneg_frac25", "qc_nonneg_every4", "qc_nonneg_remat"),
        dict(quick=Sizes((1,), 1, 1, 2), cpu=Sizes((4,), 2, 2, 4),
             accelerator=Sizes((32, 128), 128, 100, 16))),
}


# ---------------------------------------------------------------------------- helpers

def with_compute_dtype(score_fn: score.ScoreFn, dtype) -> score.ScoreFn:
    """score_fn evaluated with parameters and inputs cast to dtype (float32 masters)."""
    if dtype == jnp.float32:
        return score_fn

    def cast(tree):
        return jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    def low_precision(params, x, t, key=None):
        return score_fn(cast(params), x.astype(dtype), t, key).astype(x.dtype)

    return low_precision


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed_first_call(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _memory_mb(compiled) -> float | None:
    """XLA's per-device peak estimate for a compiled program, in MiB."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    return total / 2**20


def _gflops(compiled) -> float | None:
    """XLA's count of floating-point operations of a compiled program (per device), 1e9."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 1e9 if cost and "flops" in cost else None


def _device_peak_mb(mesh) -> float | None:
    stats = mesh.devices.flat[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def _round_up(batch: int, multiple: int) -> int:
    return -(-batch // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every section needs for one (model, device count)."""
    name: str
    spec: ModelSpec
    config: ml_collections.ConfigDict
    model: experiment.ScoreModel
    score_fn: score.ScoreFn
    mesh: jax.sharding.Mesh
    quick: bool

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    def data(self, batch: int, seed: int = 0) -> np.ndarray:
        """A batch of clean data [batch, *shape]: toy samples, or uniform-noise images."""
        key = jax.random.key(seed)
        if self.model.data_shape == (2,):
            return np.asarray(toy.sample_toy(self.config.data.name, key, batch))
        return np.asarray(jax.random.uniform(key, (batch, *self.model.data_shape)))

    def shard(self, array) -> jax.Array:
        return jax.device_put(array, parallel.data_sharding(self.mesh))

    def params(self):
        return jax.device_put(self.model.init_params, parallel.replicated(self.mesh))

    def row(self, section: str, **values) -> dict:
        return dict(section=section, model=self.name, devices=self.devices, **values)


# ---------------------------------------------------------------------------- sections

def _programs(name: str, bench: Bench, optimizer) -> list[tuple[Callable, int]]:
    """The jitted train steps of one variant and how many times a cycle of it runs each
    (the every-k variants: the penalised program once, the plain one k - 1 times)."""
    cfg = bench.config
    options = VARIANTS[name]
    loss_fn = losses.make_loss_fn(
        bench.score_fn, bench.model.sde, weighting=cfg.loss.weighting, eps=cfg.loss.eps,
        **({} if options is None else dict(qc_weight=bench.spec.qc_weight, **options)))
    every = (options or {}).get("qc_every", 1)
    replicated = parallel.replicated(bench.mesh)
    step_for = train.make_step_selector(
        loss_fn, optimizer, cfg.optim.ema_decay, every,
        functools.partial(jax.jit, in_shardings=(replicated, parallel.data_sharding(bench.mesh)),
                          out_shardings=(replicated, replicated), donate_argnums=0))
    return [(step_for(0), 1)] + ([(step_for(1), every - 1)] if every > 1 else [])


def _train_rows(bench: Bench, batch: int, info: dict, times: dict) -> list[dict]:
    """One row per compiled variant; step times are medians over the rounds timed so far
    (None before the first)."""
    medians = {name: statistics.median(ts) for name, ts in times.items() if ts}
    dsm_gflops = info["dsm"]["gflops"] if "dsm" in info else None
    peak = _device_peak_mb(bench.mesh)  # the process's peak so far, where reported
    rows = []
    for name, variant_info in info.items():
        step_s, gflops = medians.get(name), variant_info["gflops"]
        rows.append(bench.row(
            "train", variant=name, batch=batch,
            step_ms=None if step_s is None else 1e3 * step_s,
            step_ms_min=1e3 * min(times[name]) if times[name] else None,
            examples_per_s=None if step_s is None else batch / step_s,
            ratio_to_dsm=step_s / medians["dsm"] if step_s and "dsm" in medians else None,
            rounds=len(times[name]),
            flop_ratio=gflops / dsm_gflops if gflops and dsm_gflops else None,
            tflops_per_s=gflops / step_s / 1e3 if gflops and step_s else None,
            device_peak_mb=peak, **variant_info))
    return rows


def bench_train(bench: Bench, batch: int, variants: list[str], rounds: int,
                report: Callable[[list[dict]], None]) -> list[dict]:
    """Compile time, memory, flops and step time of each variant, timed round-robin.

    A variant's time is the mean over a cycle of its steps (qc_every of them for the
    every-k variants), so it is the amortised cost per step. report(rows) gets the rows
    measured so far after each compilation and each round, so a run cut short keeps them.
    """
    optimizer = train.make_optimizer(bench.config.optim)
    state = jax.jit(lambda p: train.init_state(p, optimizer, bench.config.seed),
                    out_shardings=parallel.replicated(bench.mesh))(bench.model.init_params)
    data = bench.shard(bench.data(batch))
    cycles, info, times = {}, {}, {}
    for name in variants:
        cycle, compile_s, memory, flops = [], 0.0, [], []
        for program, count in _programs(name, bench, optimizer):
            start = time.perf_counter()
            compiled = program.lower(state, data).compile()
            compile_s += time.perf_counter() - start
            state, metrics = jax.block_until_ready(compiled(state, data))  # warm-up
            cycle.append((compiled, count))
            memory.append(_memory_mb(compiled))
            gflops = _gflops(compiled)
            flops.append(None if gflops is None else gflops * count)
        cycles[name], times[name] = cycle, []
        steps = sum(count for _, count in cycle)
        info[name] = dict(compile_s=compile_s,
                          memory_mb=None if None in memory else max(memory),
                          gflops=None if None in flops else sum(flops) / steps,
                          finite=bool(np.isfinite(float(metrics["loss"]))))
        print(f"  compiled {bench.name} x{bench.devices} batch {batch} {name}: "
              f"{compile_s:.1f} s", flush=True)
        report(_train_rows(bench, batch, info, times))
    for round_index in range(rounds):
        for name, cycle in cycles.items():
            start = time.perf_counter()
            for compiled, count in cycle:
                for _ in range(count):
                    state, metrics = compiled(state, data)
            jax.block_until_ready((state, metrics))
            times[name].append((time.perf_counter() - start)
                               / sum(count for _, count in cycle))
        print(f"  timed round {round_index + 1}/{rounds}", flush=True)
        report(_train_rows(bench, batch, info, times))
    return _train_rows(bench, batch, info, times)


def bench_score(bench: Bench, batch: int) -> list[dict]:
    x = bench.shard(bench.data(batch))
    t = bench.shard(np.full((batch,), 0.5, np.float32))
    params = bench.params()
    fn = jax.jit(lambda p, y, s: bench.score_fn(p, y, s, None))
    _, first_s = _timed_first_call(lambda: fn(params, x, t))
    call_s = _median_time(lambda: fn(params, x, t), 3 if bench.quick else 10)
    return [bench.row("score", batch=batch, compile_s=first_s - call_s, call_ms=1e3 * call_s,
                      examples_per_s=batch / call_s)]


def bench_pc(bench: Bench, batch: int, num_steps: int) -> list[dict]:
    sc = bench.config.sampling
    keys = bench.shard(np.asarray(jax.random.key_data(
        jax.random.split(jax.random.key(0), batch))))

    def local(p, key_data):
        return sampling.pc_sample_per_key(
            p, jax.random.wrap_key_data(key_data), score_fn=bench.score_fn,
            sde=bench.model.sde, shape=bench.model.data_shape, num_steps=num_steps,
            predictor=sc.predictor, corrector=sc.corrector, snr=sc.snr,
            corrector_steps=sc.corrector_steps, denoise=sc.denoise, eps=sc.eps)

    fn = jax.jit(parallel.per_shard(local, bench.mesh, num_replicated=1, num_batched=1))
    params = bench.params()
    _, first_s = _timed_first_call(lambda: fn(params, keys))
    run_s = _median_time(lambda: fn(params, keys), 1 if bench.quick else 2)
    evaluations = num_steps * (1 + sc.corrector_steps) + int(sc.denoise)
    return [bench.row("pc", batch=batch, steps=num_steps, compile_s=first_s - run_s,
                      run_s=run_s, steps_per_s=num_steps / run_s,
                      score_evals_per_s=evaluations * batch / run_s)]


def _tolerances(bench: Bench, section) -> tuple[float, float]:
    return (1e-2, 1e-2) if bench.quick else (section.rtol, section.atol)


def bench_ode(bench: Bench, batch: int) -> list[dict]:
    sc = bench.config.sampling
    rtol, atol = _tolerances(bench, sc)
    prior = bench.shard(np.asarray(bench.model.sde.prior_sample(
        jax.random.key(1), (batch, *bench.model.data_shape))))

    def local(p, z):
        return sampling.ode_sample_from_prior(p, z, score_fn=bench.score_fn,
                                              sde=bench.model.sde, rtol=rtol, atol=atol,
                                              eps=sc.eps)

    fn = jax.jit(parallel.per_shard(local, bench.mesh, num_replicated=1, num_batched=1))
    params = bench.params()
    (_, nfe), first_s = _timed_first_call(lambda: fn(params, prior))
    run_s = _median_time(lambda: fn(params, prior), 1)
    nfe = np.asarray(nfe)
    return [bench.row("ode", batch=batch, rtol=rtol, atol=atol, nfe_mean=float(nfe.mean()),
                      nfe_max=int(nfe.max()), compile_s=first_s - run_s, run_s=run_s,
                      s_per_1000=1000 * run_s / batch)]


def bench_likelihood(bench: Bench, batch: int) -> list[dict]:
    ev = bench.config.eval
    rtol, atol = _tolerances(bench, ev)
    x = bench.data(batch, seed=2)
    hutchinson = ev.divergence == "hutchinson"

    def local(p, y, *probes):
        _, _, nfe = likelihood.ode_log_likelihood(
            p, y, score_fn=bench.score_fn, sde=bench.model.sde, divergence=ev.divergence,
            probes=probes[0] if probes else None, rtol=rtol, atol=atol, eps=ev.eps)
        return nfe

    arrays = [bench.shard(x)]
    if hutchinson:
        arrays.append(bench.shard(np.asarray(
            asymmetry.sample_probes(jax.random.key(3), x.shape))))
    fn = jax.jit(parallel.per_shard(local, bench.mesh, num_replicated=1,
                                    num_batched=len(arrays)))
    params = bench.params()
    nfe, first_s = _timed_first_call(lambda: fn(params, *arrays))
    run_s = _median_time(lambda: fn(params, *arrays), 1)
    nfe = np.asarray(nfe)
    return [bench.row("likelihood", batch=batch, divergence=ev.divergence, rtol=rtol,
                      atol=atol, nfe_mean=float(nfe.mean()), nfe_max=int(nfe.max()),
                      compile_s=first_s - run_s, run_s=run_s,
                      s_per_1000=1000 * run_s / batch)]


def _antisymmetric(dim: int, key: jax.Array) -> jax.Array:
    """A random antisymmetric D x D matrix with ||A||_F^2 = D (D - 1) / 2 on average."""
    m = jax.random.normal(key, (dim, dim))
    return (m - m.T) / 2


def bench_accuracy(bench: Bench, batch: int, dtype) -> list[dict]:
    """bfloat16 error of the 'nonneg' penalty estimate on fields with known asymmetry.

    Field: s = s_c + e A x, s_c the model's conservative (energy) form, A antisymmetric,
    so J = J_c + e A with J_c symmetric: Asym = 2 e^2 ||A||_F^2 exactly and
    NAsym = e^2 ||A||^2 / (||J_c||^2 + e^2 ||A||^2), set to each ASYMMETRY_LEVELS value.
    Reports, per sample, the median relative error of the float32 estimate against the
    true Asym (probe noise) and of the low-precision estimate against float32 (same
    probes), and the relative error of the batch-mean estimate.
    """
    cfg = bench.config
    apply_fn, params = models.functional(
        models.build_model(cfg, bench.model.data_shape, jax.random.key(cfg.seed)))
    conservative = score.make_score_fn(apply_fn, bench.model.sde, "constrained",
                                       cfg.model.output)
    shape = (batch, *bench.model.data_shape)
    dim = math.prod(bench.model.data_shape)
    x = jnp.asarray(bench.data(batch)) + 0.3 * jax.random.normal(jax.random.key(4), shape)
    t = jnp.full((batch,), 0.3)
    a = _antisymmetric(dim, jax.random.key(5))
    v = asymmetry.sample_probes(jax.random.key(6), shape)
    per_sample = lambda y: jnp.sum(jnp.square(y).reshape(batch, -1), axis=1)

    def estimator(score_fn):
        """scale -> (penalty estimate [B], ||J v||^2 [B]) for s = score_fn + scale A x."""
        def field(z, scale):
            linear = (z.reshape(batch, dim) @ a.T).reshape(z.shape)
            return score_fn(params, z, t, None) + scale * linear

        def run(scale):
            _, jv, jtv = asymmetry.jacobian_products(lambda z: field(z, scale), x, v)
            return 0.5 * per_sample(jtv - jv), per_sample(jv)

        return jax.jit(run)

    high = estimator(conservative)
    low = estimator(with_compute_dtype(conservative, dtype))
    jc_norm2 = float(jnp.mean(high(jnp.float32(0.0))[1]))  # E ||J_c v||^2 = ||J_c||_F^2
    a_norm2 = float(jnp.sum(a * a))
    rows = []
    for level in ASYMMETRY_LEVELS:
        scale = jnp.float32(math.sqrt(level * jc_norm2 / (a_norm2 * (1 - level))))
        exact = 2 * float(scale) ** 2 * a_norm2
        est_high = np.asarray(high(scale)[0])
        est_low = np.asarray(low(scale)[0])
        rows.append(bench.row(
            "accuracy", batch=batch, dtype=jnp.dtype(dtype).name, nasym=level,
            probe_noise=float(np.median(np.abs(est_high - exact) / exact)),
            low_vs_f32=float(np.median(np.abs(est_low - est_high) / est_high)),
            batch_mean_low_vs_f32=float(abs(est_low.mean() - est_high.mean())
                                        / est_high.mean()),
            batch_mean_f32_vs_exact=float(abs(est_high.mean() - exact) / exact)))
    return rows


def bench_gradient_noise(bench: Bench, batch: int, num_draws: int) -> list[dict]:
    """Probe noise of the penalty's parameter gradient, per loss.qc_gradient mode.

    For one batch of x_t (t ~ U(0.05, 1)) and num_draws probe draws, the gradient g_k of
    the batch-mean std^2-weighted penalty (one probe per sample) with each mode on the same
    probes. Both modes estimate the same expected gradient; rel_noise is the standard
    deviation of g_k over draws, sqrt(E ||g_k - mean g||^2), over the norm of the mean of
    all draws of both modes; mean_gap is the distance between the two modes' means on the
    same scale (about rel_noise / sqrt(num_draws) when they agree).
    """
    shape = (batch, *bench.model.data_shape)
    kt, kz, kv = jax.random.split(jax.random.key(7), 3)
    t = jax.random.uniform(kt, (batch,), minval=0.05, maxval=1.0)
    mean, std = bench.model.sde.marginal_mean_std(jnp.asarray(bench.data(batch)), t)
    x = mean + bcast(std, mean) * jax.random.normal(kz, shape)
    probe_keys = jax.random.split(kv, num_draws)
    flat = lambda tree: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])

    def gradients(gradient):
        def penalty(params, key):
            field = lambda y, times: bench.score_fn(params, y, times, None)
            _, per_sample = asymmetry.asymmetry_penalty(field, x, t, key, gradient=gradient)
            return jnp.mean(jnp.square(std) * per_sample)
        grad = jax.jit(lambda p, key: flat(jax.grad(penalty)(p, key)))
        params = bench.model.init_params
        return jnp.stack([grad(params, key) for key in probe_keys])

    draws = {mode: gradients(mode) for mode in asymmetry.GRADIENTS}
    means = {mode: jnp.mean(g, axis=0) for mode, g in draws.items()}
    scale = float(jnp.linalg.norm((means["jvp"] + means["estimate"]) / 2))
    gap = float(jnp.linalg.norm(means["jvp"] - means["estimate"])) / scale
    spread = lambda g, m: math.sqrt(float(jnp.sum(jnp.square(g - m))) / (num_draws - 1))
    return [bench.row("gradnoise", batch=batch, qc_gradient=mode, draws=num_draws,
                      rel_noise=spread(g, means[mode]) / scale, mean_gap=gap)
            for mode, g in draws.items()]


# ---------------------------------------------------------------------------- driver

def _bench(name: str, n_devices: int, dtype, quick: bool) -> Bench:
    if n_devices > jax.device_count():
        raise SystemExit(f"--devices {n_devices}: only {jax.device_count()} devices; on CPU "
                         "set JAX_NUM_CPU_DEVICES (python -m benchmarks.run does).")
    spec = MODELS[name]
    cfg = spec.config()
    model = experiment.build_score_model(cfg)
    mesh = parallel.make_mesh(devices=jax.devices()[:n_devices])
    return Bench(name, spec, cfg, model, with_compute_dtype(model.score_fn, dtype), mesh,
                 quick)


def run_model(name: str, n_devices: int, args: argparse.Namespace,
              report: Callable[[list[dict]], None]) -> list[dict]:
    """All sections of one model; report(rows) gets every row measured so far, as it
    grows (section by section, train variant by variant and round by round)."""
    bench = _bench(name, n_devices, jnp.dtype(args.dtype), args.quick)
    spec = bench.spec
    tier = "quick" if args.quick else ("cpu" if jax.default_backend() == "cpu"
                                       else "accelerator")
    sizes = spec.sizes[tier]
    sample_batch = _round_up(sizes.sample_batch, n_devices)
    rows = []
    def finish(section_rows: list[dict]) -> list[dict]:
        """Adds the run's dtype and tier, and the fraction of --peak_tflops achieved."""
        return [dict(row, dtype=row.get("dtype", args.dtype), tier=tier,
                     **({"of_peak": row["tflops_per_s"] / args.peak_tflops}
                        if args.peak_tflops and row.get("tflops_per_s") else {}))
                for row in section_rows]

    if "train" in args.sections:
        unknown = sorted(set(args.variants or ()) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}.")
        variants = [v for v in (args.variants or spec.variants) if v in spec.variants]
        variants = ["dsm"] + [v for v in variants if v != "dsm"]  # the ratios' reference
        for batch in args.batch or sizes.train_batches:
            rows += finish(bench_train(bench, _round_up(batch, n_devices), variants,
                                       args.rounds or (2 if args.quick else 5),
                                       lambda partial: report(rows + finish(partial))))
    sections = dict(score=lambda: bench_score(bench, sample_batch),
                    pc=lambda: bench_pc(bench, sample_batch, sizes.pc_steps),
                    ode=lambda: bench_ode(bench, sample_batch),
                    likelihood=lambda: bench_likelihood(bench, sample_batch),
                    accuracy=lambda: bench_accuracy(bench, sizes.accuracy_batch, jnp.bfloat16),
                    gradnoise=lambda: bench_gradient_noise(bench, sizes.accuracy_batch,
                                                           4 if args.quick else 32))
    if n_devices != min(args.devices):  # Device-independent: once per model.
        del sections["accuracy"], sections["gradnoise"]
    for section, run in sections.items():
        if section in args.sections:
            start = time.perf_counter()
            rows += finish(run())
            report(rows)
            print(f"  {section} {name} x{n_devices}: {time.perf_counter() - start:.0f} s",
                  flush=True)
    return rows


def machine() -> dict:
    """Where a table ran: backend, devices, CPU and the load around the run."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(backend=jax.default_backend(), device_kind=device.device_kind,
                device_count=jax.device_count(), cpu=cpu, cpu_count=os.cpu_count(),
                jax=jax.__version__, python=platform.python_version(),
                load_average=os.getloadavg())


COLUMNS = {
    "train": ["model", "devices", "batch", "dtype", "variant", "compile_s", "memory_mb",
              "device_peak_mb", "gflops", "flop_ratio", "step_ms", "examples_per_s",
              "ratio_to_dsm", "tflops_per_s", "of_peak"],
    "score": ["model", "devices", "batch", "dtype", "compile_s", "call_ms", "examples_per_s"],
    "pc": ["model", "devices", "batch", "dtype", "steps", "compile_s", "run_s", "steps_per_s",
           "score_evals_per_s"],
    "ode": ["model", "devices", "batch", "dtype", "rtol", "nfe_mean", "nfe_max", "compile_s",
            "run_s", "s_per_1000"],
    "likelihood": ["model", "devices", "batch", "dtype", "divergence", "rtol", "nfe_mean",
                   "nfe_max", "compile_s", "run_s", "s_per_1000"],
    "gradnoise": ["model", "batch", "dtype", "qc_gradient", "draws", "rel_noise", "mean_gap"],
    "accuracy": ["model", "batch", "dtype", "nasym", "probe_noise", "low_vs_f32",
                 "batch_mean_low_vs_f32", "batch_mean_f32_vs_exact"],
}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-2 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def format_table(rows: list[dict], section: str) -> str:
    """A Markdown table of one section's rows."""
    columns = COLUMNS[section]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(args: argparse.Namespace) -> dict:
    """Runs every (device count, model) in turn and prints each one's tables as it
    finishes; --json is rewritten whenever a row is added or updated (each compiled
    train variant, each timed round, each section), so a run cut short keeps them."""
    start = machine()
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')} on {start['backend']} "
          f"({start['device_kind']} x{start['device_count']}; {start['cpu']}, "
          f"{start['cpu_count']} cores), load average {start['load_average']}", flush=True)
    result = dict(args=vars(args), machine=start, rows=[])
    def save(rows: list[dict]) -> None:
        if args.json:
            _write_json(args.json, dict(result, rows=result["rows"] + rows,
                                        load_average_end=os.getloadavg()))

    for n_devices in args.devices:
        for name in args.models:
            rows = run_model(name, n_devices, args, save)
            result["rows"] += rows
            result["load_average_end"] = os.getloadavg()
            for section in COLUMNS:
                section_rows = [r for r in rows if r["section"] == section]
                if section_rows:
                    print(f"\n## {section}: {name}, {n_devices} device(s)\n\n"
                          f"{format_table(section_rows, section)}", flush=True)
            print(f"\nload average now: {result['load_average_end']}\n", flush=True)
            save([])
    return result
