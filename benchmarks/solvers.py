"""Unit cost of the fixed-step solvers: time per sample per score evaluation (NFE),
against one score evaluation of the same batch.

  python -m benchmarks.solvers                                  # toy MLP, NCSN++ smoke
  python -m benchmarks.solvers --models toy --batch 5000 --steps 20 --rounds 7 --json out.json

Every round times one jitted loop of num_steps score evaluations of the batch (score_ms:
its time per evaluation, free of per-call dispatch) and then one run of each solver
(sampling.SOLVERS, num_steps fixed, the config's settings), so load changes on a shared
machine hit all of them alike. Per round, ratio = (solver run time / NFE) / score_ms:
1 means the solver costs exactly its score evaluations; the excess is the solver's own
work (state updates, the per-sample noise of the stochastic ones). The table gives the
median ratio over rounds with its range; --json also keeps every round's values.
Networks are freshly initialised on one device; the cost does not depend on training.
"""

import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.suite import machine
from qcsbm_jax import config as config_lib, experiment, sampling

MODELS = {  # name: (config, default batch, default num_steps)
    "toy": (lambda: config_lib.toy_config("gaussians8", "usbm", "smoke"), 5000, 20),
    "ncsnpp_smoke": (lambda: config_lib.image_config("fashion_mnist", "usbm", "smoke"), 8, 5),
}
COLUMNS = ("model", "batch", "method", "steps", "nfe", "compile_s", "run_ms", "ms_per_nfe",
           "score_ms", "ratio", "ratio_min", "ratio_max")


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench_model(name: str, batch: int, num_steps: int, rounds: int) -> list[dict]:
    """One row per solver of model `name` (see the module docstring)."""
    config = MODELS[name][0]()
    model = experiment.build_score_model(config)
    params = jax.device_put(model.init_params)
    sc = config.sampling
    keys = jax.random.split(jax.random.key(0), batch)
    x = jax.random.normal(jax.random.key(1), (batch, *model.data_shape))
    t = jnp.full((batch,), 0.5)

    @jax.jit
    def score(p, x, t):
        """num_steps score evaluations in one loop (x moves, so none can be hoisted)."""
        return jax.lax.fori_loop(
            0, num_steps, lambda i, y: y + 1e-3 * model.score_fn(p, y, t, None), x)
    programs = {}
    for method, fn in sampling.SOLVERS.items():
        settings = {k: sc[k] for k in sampling.SETTINGS[method]}
        programs[method] = jax.jit(lambda p, k, fn=fn, settings=settings: fn(
            p, k, score_fn=model.score_fn, sde=model.sde, shape=model.data_shape,
            num_steps=num_steps, eps=sc.eps, **settings))
    compile_s = {"score": _timed(lambda: score(params, x, t))}
    nfe = {}
    for method, program in programs.items():
        compile_s[method] = _timed(lambda: program(params, keys))
        nfe[method] = int(program(params, keys)[1][0])
    times = {method: [] for method in ["score", *programs]}
    for round_index in range(rounds):
        times["score"].append(_timed(lambda: score(params, x, t)))
        for method, program in programs.items():
            times[method].append(_timed(lambda: program(params, keys)))
        print(f"  {name}: round {round_index + 1}/{rounds}", flush=True)
    rows = []
    times["score"] = [s / num_steps for s in times["score"]]
    for method in programs:
        ratios = [run / nfe[method] / s for run, s in zip(times[method], times["score"])]
        run_s = statistics.median(times[method])
        rows.append(dict(
            model=name, batch=batch, method=method, steps=num_steps, nfe=nfe[method],
            compile_s=compile_s[method] - run_s, run_ms=1e3 * run_s,
            ms_per_nfe=1e3 * run_s / nfe[method],
            score_ms=1e3 * statistics.median(times["score"]), ratio=statistics.median(ratios),
            ratio_min=min(ratios), ratio_max=max(ratios), ratios=ratios,
            score_round_ms=[1e3 * s for s in times["score"]],
            run_round_ms=[1e3 * r for r in times[method]]))
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.solvers",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="toy,ncsnpp_smoke",
                        help=f"comma-separated, from {tuple(MODELS)}")
    parser.add_argument("--batch", type=int, default=None, help="default: per model")
    parser.add_argument("--steps", type=int, default=None,
                        help="num_steps of every solver (default: per model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {tuple(MODELS)}.")
    start = machine()
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')} on {start['backend']} "
          f"({start['cpu']}, {start['cpu_count']} cores), load average "
          f"{start['load_average']}", flush=True)
    rows = []
    for name in names:
        _, batch, steps = MODELS[name]
        rows += bench_model(name, args.batch or batch, args.steps or steps, args.rounds)
    result = dict(args=vars(args), machine=start, load_average_end=os.getloadavg(), rows=rows)
    print("\n" + format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
