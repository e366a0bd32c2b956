"""The sampling sections: the score network's unit cost and the samplers users run.

score  one evaluation of the model's score function (the samplers' unit cost) on a
       batch sharded over the mesh.
pc     predictor-corrector sampling, ode probability-flow ODE sampling (adaptive RK45):
       api.Run.sample, i.e. sampling.registry.make_sampler with the config's settings
       (the program of `--mode sample`, `--mode eval` and qcsbm_jax.load(...).sample),
       keys, prior draws and the copy of the samples to the host included.
"""

import jax
import numpy as np

from benchmarks import common


def quick_tolerances(bench: common.Bench, group) -> tuple[float, float]:
    """(rtol, atol) of an ODE solve: 1e-2 for --quick, else the config group's."""
    return (1e-2, 1e-2) if bench.quick else (group.rtol, group.atol)


def bench_score(bench: common.Bench, batch: int) -> list[dict]:
    x = bench.shard(bench.data(batch))
    t = bench.shard(np.full((batch,), 0.5, np.float32))
    params = bench.params()
    fn = jax.jit(lambda p, y, s: bench.model.score_fn(p, y, s, None))
    _, first_s = common.timed_first_call(lambda: fn(params, x, t))
    call_s = common.median_seconds(lambda: fn(params, x, t), 3 if bench.quick else 10)
    return [bench.row("score", batch=batch, compile_s=first_s - call_s, call_ms=1e3 * call_s,
                      examples_per_s=batch / call_s)]


def _time_sampler(bench: common.Bench, batch: int, method: str, repeats: int,
                  **settings) -> tuple[np.ndarray, float, float]:
    """(NFE per sample [batch], first call's s, median s of `repeats` more) of `batch`
    samples by run.sample(batch, method, **settings) in one program."""
    run = bench.user_run(batch)
    sample = lambda: run.sample(batch, method, seed=0, **settings)
    (_, info), first_s = common.timed_first_call(sample)
    return np.asarray(info["nfe"]), first_s, common.median_seconds(sample, repeats)


def bench_pc(bench: common.Bench, batch: int, num_steps: int) -> list[dict]:
    nfe, first_s, run_s = _time_sampler(bench, batch, "pc", 1 if bench.quick else 2,
                                        num_steps=num_steps)
    return [bench.row("pc", batch=batch, steps=num_steps, nfe_mean=float(nfe.mean()),
                      compile_s=first_s - run_s, run_s=run_s, steps_per_s=num_steps / run_s,
                      score_evals_per_s=float(nfe.sum()) / run_s)]


def bench_ode(bench: common.Bench, batch: int) -> list[dict]:
    rtol, atol = quick_tolerances(bench, bench.config.sampling)
    nfe, first_s, run_s = _time_sampler(bench, batch, "ode", 1, rtol=rtol, atol=atol)
    return [bench.row("ode", batch=batch, rtol=rtol, atol=atol, nfe_mean=float(nfe.mean()),
                      nfe_max=int(nfe.max()), compile_s=first_s - run_s, run_s=run_s,
                      s_per_1000=1000 * run_s / batch)]
