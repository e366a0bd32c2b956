"""Unit cost of the fixed-step solvers: time per sample per score evaluation (NFE),
against one score evaluation of the same batch.

  python -m benchmarks.solvers                                  # toy MLP, NCSN++ smoke
  python -m benchmarks.solvers --models toy --batch 5000 --steps 20 --rounds 7 --json out.json

Every round times one jitted loop of num_steps score evaluations of the batch (score_ms:
its time per evaluation, free of per-call dispatch) and then one run of each solver
(sampling.SOLVERS, num_steps fixed, the config's settings) as users run it
(sampling.registry.make_sampler: keys, prior draws and the copy to the host included), so
load changes on a shared machine hit all of them alike. Per round, ratio = (solver run
time / NFE) / score_ms: 1 means the solver costs exactly its score evaluations; the excess
is the solver's own work (state updates, the per-sample noise of the stochastic ones). The
table gives the median ratio over rounds with its range; --json also keeps every round's
values.
Networks are freshly initialised on one device; the cost does not depend on training.
"""

import argparse
import os
import statistics

import jax
import jax.numpy as jnp

from benchmarks import common
from qcsbm_jax import config as config_lib, experiment, parallel, sampling
from qcsbm_jax.sampling import registry

MODELS = {  # name: (config, default batch, default num_steps)
    "toy": (lambda: config_lib.toy_config("gaussians8", "usbm", "smoke"), 5000, 20),
    "ncsnpp_smoke": (lambda: config_lib.image_config("fashion_mnist", "usbm", "smoke"), 8, 5),
}
COLUMNS = ("model", "batch", "method", "steps", "nfe", "compile_s", "run_ms", "ms_per_nfe",
           "score_ms", "ratio", "ratio_min", "ratio_max")


def bench_model(name: str, batch: int, num_steps: int, rounds: int) -> list[dict]:
    """One row per solver of model `name` (see the module docstring)."""
    config = MODELS[name][0]()
    model = experiment.build_score_model(config)
    params = jax.device_put(model.init_params)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (batch, *model.data_shape))
    t = jnp.full((batch,), 0.5)

    @jax.jit
    def score(p, x, t):
        """num_steps score evaluations in one loop (x moves, so none can be hoisted)."""
        return jax.lax.fori_loop(
            0, num_steps, lambda i, y: y + 1e-3 * model.score_fn(p, y, t, None), x)
    programs = {method: registry.make_sampler(
        model, mesh, method, batch_size=batch, **registry.settings_from_config(
            config.sampling, method, num_steps=num_steps)) for method in sampling.SOLVERS}
    compile_s = {"score": common.seconds(lambda: score(params, x, t))}
    nfe = {}
    for method, program in programs.items():
        compile_s[method] = common.seconds(lambda: program(params, key, batch))
        nfe[method] = int(program(params, key, batch)[1][0])
    times = {method: [] for method in ["score", *programs]}
    for round_index in range(rounds):
        times["score"].append(common.seconds(lambda: score(params, x, t)))
        for method, program in programs.items():
            times[method].append(common.seconds(lambda: program(params, key, batch)))
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
    return common.markdown_table(rows, COLUMNS)


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
    start = common.machine()
    common.print_machine(start)
    rows = []
    for name in names:
        _, batch, steps = MODELS[name]
        rows += bench_model(name, args.batch or batch, args.steps or steps, args.rounds)
    result = dict(args=vars(args), machine=start, load_average_end=os.getloadavg(), rows=rows)
    print("\n" + format_table(rows), flush=True)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
