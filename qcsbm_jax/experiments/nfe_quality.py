"""Sample quality against the number of score evaluations (NFE), per solver and family.

    python -m qcsbm_jax.experiments.nfe_quality --sweep runs/exp2 --workdir runs/nfe
        [--methods euler,heun,dpm_solver_2m,edm_stochastic,euler_maruyama,pc]
        [--steps 5,10,20,50,100,200] [--tolerances 1e-1,1e-2,1e-3,1e-4]
        [--num_samples 5000] [--datasets ...] [--families ...] [--seeds 0,1,2]

For every complete run of a toy sweep (experiments/toy_sweep.py: DIR/<data>_<family>_seed<k>)
and every sampler setting, draws num_samples samples and compares them with as many fresh
test points (eval.seed's 'test_set' stream; the same points for every run):

  sw        sliced Wasserstein-2 distance, in data units: sqrt of the mean over
            NUM_PROJECTIONS fixed random unit directions of the squared 1D Wasserstein-2
            distance between the projected sets (sorted projections of equal-size sets);
            the distance between two independent test sets of the same size is reported
            as its noise floor (`floor`)
  precision, recall   k-NN (k = 3) improved precision and recall (metrics.precision_recall)
  nfe       mean score evaluations per sample (each sampler's own count)

Fixed-step samplers run at each of --steps; the adaptive ODE sampler ('ode') at each of
--tolerances (rtol = atol). All runs of one (data set, family) share compiled programs:
only the parameters change. Writes DIR/results.json (every value per seed), DIR/table.md
(mean ± std over seeds) and DIR/<dataset>.png (sw against NFE, one panel per solver, one
line per family with its seed spread).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from qcsbm_jax import api, config as config_lib, data, metrics, plotting, restore
from qcsbm_jax.data.toy import TOY_DATASETS
from qcsbm_jax.experiments import toy_sweep

NUM_PROJECTIONS = 1024
PROJECTION_SEED = 0


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = NUM_PROJECTIONS,
                       seed: int = PROJECTION_SEED) -> float:
    """Sliced Wasserstein-2 distance between equal-size point sets a, b [N, D] (module doc)."""
    if a.shape != b.shape:
        raise ValueError(f"Equal-size sets needed, got {a.shape} and {b.shape}.")
    directions = np.random.default_rng(seed).standard_normal((num_projections, a.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    pa, pb = np.sort(a @ directions.T, axis=0), np.sort(b @ directions.T, axis=0)
    return float(np.sqrt(np.mean(np.square(pa - pb))))


def sample_quality(samples: np.ndarray, reference: np.ndarray, k: int = 3) -> dict[str, float]:
    """sw, precision and recall of samples [N, D] against reference [N, D]; rows with NaN
    (failed solves) are left out of precision/recall and make sw NaN."""
    finite = np.all(np.isfinite(samples), axis=1)
    precision, recall = (metrics.precision_recall(jnp.asarray(reference),
                                                  jnp.asarray(samples[finite]), k=k)
                         if finite.sum() > k else (np.nan, np.nan))
    sw = sliced_wasserstein(samples, reference) if finite.all() else float("nan")
    return {"sw": sw, "precision": float(precision), "recall": float(recall),
            "failed": int((~finite).sum())}


def settings_grid(methods, steps, tolerances) -> list[tuple[str, dict]]:
    """(method, overrides) for every fixed-step method x steps and 'ode' x tolerances."""
    grid = []
    for method in methods:
        if method == "ode":
            grid += [("ode", {"rtol": tol, "atol": tol}) for tol in tolerances]
        else:
            grid += [(method, {"num_steps": n}) for n in steps]
    return grid


def evaluate_runs(run_dirs: list[str], grid, num_samples: int, reference: np.ndarray,
                  seed: int = 0) -> list[list[dict]]:
    """Per run dir (one data set and family, any seeds), per grid entry: quality and NFE.
    The runs share the first one's compiled programs (api.Run.with_params)."""
    template = api.load(run_dirs[0], params="raw")
    results = []
    for run_dir in run_dirs:
        params, step = restore.restore_params(template.config, run_dir, template.model,
                                              template.mesh, params="raw")
        run = template.with_params(params, step, run_dir)
        rows = []
        for method, overrides in grid:
            samples, info = run.sample(num_samples, method=method, seed=seed, **overrides)
            rows.append(dict(method=method, **overrides, nfe=float(np.mean(info["nfe"])),
                             **sample_quality(samples, reference)))
            logging.info("%s %s %s: %s", os.path.basename(run_dir), method, overrides,
                         rows[-1])
        results.append(rows)
    return results


METRICS = ("nfe", "sw", "precision", "recall", "failed")


def summarise(per_seed: dict[int, list[dict]], metrics=METRICS) -> list[dict]:
    """Grid rows with every metric as seed_statistics over the seeds (same grid order)."""
    seeds = sorted(per_seed)
    rows = []
    for i, first in enumerate(per_seed[seeds[0]]):
        row = {k: v for k, v in first.items() if k not in metrics}
        row.update({m: toy_sweep.seed_statistics([per_seed[s][i][m] for s in seeds])
                    for m in metrics})
        rows.append(dict(row, seeds=seeds))
    return rows


def format_table(title: str, results: dict, metrics=METRICS) -> str:
    """Markdown: one row per family and sampler setting, cells mean ± std over seeds."""
    lines = [f"## {title}", "", "| family | method | setting | " + " | ".join(metrics) + " |",
             "|---" * (len(metrics) + 3) + "|"]
    for family, rows in results.items():
        for row in rows:
            setting = ", ".join(f"{k}={row[k]}" for k in ("num_steps", "rtol") if k in row)
            cells = [toy_sweep.format_cell(row[m]) for m in metrics]
            lines.append(f"| {family} | {row['method']} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: str, title: str, results: dict, metric: str = "sw",
         ylabel: str = "sliced Wasserstein-2", floor: float | None = None) -> None:
    """metric against NFE (log-log), one panel per method, one line per family (mean over
    seeds, band: min to max over seeds)."""
    methods = list(dict.fromkeys(row["method"] for rows in results.values() for row in rows))
    panels = {}
    for method in methods:
        panels[method] = {}
        for family, rows in results.items():
            chosen = [r for r in rows if r["method"] == method]
            values = np.array([r[metric]["values"] for r in chosen], float)
            panels[method][family] = (np.array([r["nfe"]["mean"] for r in chosen]),
                                      np.nanmean(values, axis=1), np.nanmin(values, axis=1),
                                      np.nanmax(values, axis=1))
    plotting.panels_png(path, panels, floor=floor, xlabel="NFE per sample", ylabel=ylabel,
                        title=f"{title}: quality against NFE")


def run(sweep: str, workdir: str, datasets, families, seeds, grid, num_samples: int) -> dict:
    """Evaluates every (data set, family, seed) of the sweep; writes the outputs."""
    os.makedirs(workdir, exist_ok=True)
    results, tables = {}, []
    for dataset in datasets:
        reference_config = config_lib.toy_config(dataset, "usbm")
        with reference_config.unlocked():
            reference_config.eval.num_points = 2 * num_samples
        test = data.toy_test_set(reference_config)
        reference, second = test[:num_samples], test[num_samples:]
        floor = sliced_wasserstein(second, reference)
        results[dataset] = {"floor": floor, "families": {}}
        for family in families:
            run_dirs = [os.path.join(sweep, toy_sweep.run_name(dataset, family, s))
                        for s in seeds]
            missing = [d for d in run_dirs if not os.path.isdir(os.path.join(d, "checkpoints"))]
            if missing:
                raise FileNotFoundError(f"No trained runs at {missing}; run the toy sweep "
                                        "(experiments/toy_sweep.py) first.")
            per_run = evaluate_runs(run_dirs, grid, num_samples, reference)
            results[dataset]["families"][family] = summarise(dict(zip(seeds, per_run)))
        plot(os.path.join(workdir, f"{dataset}.png"), dataset, results[dataset]["families"],
             floor=floor)
        tables.append(format_table(f"{dataset} (sw noise floor {floor:.3g})",
                                   results[dataset]["families"]))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write("\n".join(tables))
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    grid = settings_grid(f.methods, [int(n) for n in f.steps], [float(t) for t in f.tolerances])
    run(os.path.abspath(f.sweep), os.path.abspath(f.workdir), f.datasets, f.families,
        [int(s) for s in f.seeds], grid, f.num_samples)
    with open(os.path.join(f.workdir, "table.md")) as table:
        print(table.read())


if __name__ == "__main__":
    flags.DEFINE_string("sweep", None, "Toy sweep directory (experiments/toy_sweep.py).")
    flags.DEFINE_string("workdir", None, "Output directory.")
    flags.DEFINE_list("methods", ["euler", "heun", "dpm_solver_2m", "edm_stochastic",
                                  "euler_maruyama", "pc", "ode"], "Samplers.")
    flags.DEFINE_list("steps", ["5", "10", "20", "50", "100", "200"],
                      "num_steps of the fixed-step samplers.")
    flags.DEFINE_list("tolerances", ["1e-1", "1e-2", "1e-3", "1e-4"],
                      "rtol = atol of the adaptive ODE sampler.")
    flags.DEFINE_integer("num_samples", 5000, "Samples per setting and run.")
    flags.DEFINE_list("datasets", list(TOY_DATASETS), "Toy data sets.")
    flags.DEFINE_list("families", list(config_lib.TOY_FAMILIES), "Model families.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the sweep's runs.")
    flags.mark_flags_as_required(["sweep", "workdir"])
    app.run(main)
