"""The train-step section (and the probe noise of the penalty's gradient).

train      one jitted train step per variant, built from the variant's config exactly as
           train.train builds it (train.make_training_programs, on the model in
           training.compute_dtype), timed side by side: every round runs each variant in
           turn on one shared state, so load changes on a shared machine hit all variants
           alike and the ratio to DSM stays meaningful.
gradnoise  probe noise of the penalty's parameter gradient for each loss.qc_gradient.
"""

import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import common
from qcsbm_jax import asymmetry, train
from qcsbm_jax.sde import bcast

# Train-step variants: config.loss settings on top of the run's config (with its
# --override values); every variant but 'dsm' also sets loss.qc_weight to the model's.
VARIANTS = {
    "dsm": dict(qc_weight=0.0),
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


def variant_config(bench: common.Bench, name: str) -> ml_collections.ConfigDict:
    """The run's config with the variant's loss settings."""
    config = bench.config.copy_and_resolve_references()
    qc_weight = {} if name == "dsm" else dict(qc_weight=bench.spec.qc_weight)
    config.loss.update(dict(qc_weight, **VARIANTS[name]))
    return config


def step_programs(bench: common.Bench, name: str) -> list[tuple[Callable, int]]:
    """The jitted train steps of one variant, as train.train makes them, and how many
    times a cycle runs each (qc_every = k: the penalised program once, the plain one
    k - 1 times)."""
    config = variant_config(bench, name)
    step_for = train.make_training_programs(config, bench.train_model, bench.mesh).step_for
    every = config.loss.qc_every if config.loss.qc_weight > 0 else 1
    return [(step_for(0), 1)] + ([(step_for(1), every - 1)] if every > 1 else [])


def _rows(bench: common.Bench, batch: int, info: dict, times: dict) -> list[dict]:
    """One row per compiled variant; step times are medians over the rounds timed so far
    (None before the first)."""
    medians = {name: statistics.median(ts) for name, ts in times.items() if ts}
    dsm_gflops = info["dsm"]["gflops"] if "dsm" in info else None
    peak = common.device_peak_mb(bench.mesh)  # the process's peak so far, where reported
    rows = []
    for name, variant_info in info.items():
        step_s, gflops = medians.get(name), variant_info["gflops"]
        rows.append(bench.row(
            "train", variant=name, batch=batch,
            step_ms=None if step_s is None else 1e3 * step_s,
            step_ms_min=1e3 * min(times[name]) if times[name] else None,
            step_ms_rounds=[1e3 * s for s in times[name]],
            examples_per_s=None if step_s is None else batch / step_s,
            ratio_to_dsm=step_s / medians["dsm"] if step_s and "dsm" in medians else None,
            rounds=len(times[name]),
            flop_ratio=gflops / dsm_gflops if gflops and dsm_gflops else None,
            tflops_per_s=gflops / step_s / 1e3 if gflops and step_s else None,
            device_peak_mb=peak, **variant_info))
    return rows


def bench_train(bench: common.Bench, batch: int, variants: list[str], rounds: int,
                report: Callable[[list[dict]], None]) -> list[dict]:
    """Compile time, memory, flops and step time of each variant, timed round-robin.

    A variant's time is the mean over a cycle of its steps (qc_every of them for the
    every-k variants), so it is the amortised cost per step. report(rows) gets the rows
    measured so far after each compilation and each round, so a run cut short keeps them.
    """
    programs = train.make_training_programs(bench.config, bench.train_model, bench.mesh)
    state = jax.jit(programs.init, out_shardings=programs.sharding)(
        bench.train_model.init_params)
    data = bench.shard(bench.data(batch))
    cycles, info, times = {}, {}, {}
    for name in variants:
        cycle, compile_s, memory, flops = [], 0.0, [], []
        for program, count in step_programs(bench, name):
            start = time.perf_counter()
            compiled = program.lower(state, data).compile()
            compile_s += time.perf_counter() - start
            state, metrics = jax.block_until_ready(compiled(state, data))  # warm-up
            cycle.append((compiled, count))
            memory.append(common.memory_mb(compiled))
            gflops = common.gflops(compiled)
            flops.append(None if gflops is None else gflops * count)
        cycles[name], times[name] = cycle, []
        steps = sum(count for _, count in cycle)
        info[name] = dict(compile_s=compile_s,
                          memory_mb=None if None in memory else max(memory),
                          gflops=None if None in flops else sum(flops) / steps,
                          finite=bool(jnp.isfinite(metrics["loss"])))
        print(f"  compiled {bench.name} x{bench.devices} batch {batch} {name}: "
              f"{compile_s:.1f} s", flush=True)
        report(_rows(bench, batch, info, times))
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
        report(_rows(bench, batch, info, times))
    return _rows(bench, batch, info, times)


def bench_gradient_noise(bench: common.Bench, batch: int, num_draws: int) -> list[dict]:
    """Probe noise of the penalty's parameter gradient, per loss.qc_gradient mode.

    For one batch of x_t (t ~ U(0.05, 1)) and num_draws probe draws, the gradient g_k of
    the batch-mean std^2-weighted penalty (one probe per sample) with each mode on the same
    probes. Both modes estimate the same expected gradient; rel_noise is the standard
    deviation of g_k over draws, sqrt(E ||g_k - mean g||^2), over the norm of the mean of
    all draws of both modes; mean_gap is the distance between the two modes' means on the
    same scale (about rel_noise / sqrt(num_draws) when they agree).
    """
    model = bench.train_model
    shape = (batch, *model.data_shape)
    kt, kz, kv = jax.random.split(jax.random.key(7), 3)
    t = jax.random.uniform(kt, (batch,), minval=0.05, maxval=1.0)
    mean, std = model.sde.marginal_mean_std(jnp.asarray(bench.data(batch)), t)
    x = mean + bcast(std, mean) * jax.random.normal(kz, shape)
    probe_keys = jax.random.split(kv, num_draws)

    def gradients(gradient):
        def penalty(params, key):
            field = lambda y, times: model.score_fn(params, y, times, None)
            _, per_sample = asymmetry.asymmetry_penalty(field, x, t, key, gradient=gradient)
            return jnp.mean(jnp.square(std) * per_sample)
        grad = jax.jit(lambda p, key: common.flat_leaves(jax.grad(penalty)(p, key)))
        return jnp.stack([grad(model.init_params, key) for key in probe_keys])

    draws = {mode: gradients(mode) for mode in asymmetry.GRADIENTS}
    means = {mode: jnp.mean(g, axis=0) for mode, g in draws.items()}
    scale = float(jnp.linalg.norm((means["jvp"] + means["estimate"]) / 2))
    gap = float(jnp.linalg.norm(means["jvp"] - means["estimate"])) / scale
    spread = lambda g, m: math.sqrt(float(jnp.sum(jnp.square(g - m))) / (num_draws - 1))
    return [bench.row("gradnoise", batch=batch, qc_gradient=mode, draws=num_draws,
                      rel_noise=spread(g, means[mode]) / scale, mean_gap=gap)
            for mode, g in draws.items()]
