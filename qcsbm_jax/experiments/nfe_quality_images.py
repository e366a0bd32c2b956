"""Image sample quality against the number of score evaluations (NFE), per solver and model.

    python -m qcsbm_jax.experiments.nfe_quality_images \\
        --runs usbm=runs/fm_usbm_small,qcsbm=runs/fm_qcsbm_small --stats fm_train.npz \\
        --workdir runs/nfe_images [--methods euler,heun,dpm_solver_2m,edm_stochastic,pc]
        [--steps 10,20,50,100] [--tolerances 1e-2,1e-3] [--num_samples 256] [--seeds 0,1]
        [--params ema]

The image counterpart of experiments/nfe_quality.py. The runs share one network
architecture (one model each, e.g. a U-NCSN++ and its QC fine-tune); each is named by its
label. For every run, sampler setting and sampling seed, draws num_samples images and scores
them against the reference statistics (`python -m qcsbm_jax.fid stats`, with
--save_features) with the FID network (qcsbm_jax.fid.sample_metrics):

  fid       FID against the reference's mean and covariance; biased upwards at small N,
            so compare only at equal N (it is, here)
  kid       unbiased KID, against the first num_samples reference features
  precision, recall   k-NN (k = 3), on num_samples features of each side (equal sizes)
  nfe       mean score evaluations per sample (each sampler's own count)
  clipped   fraction of sample values outside the data range (clipped, as in a saved
            sample's 8-bit pixels, which are what is scored); failed: samples with NaN/inf

The seeds are sampling seeds: seed s gives every run the same prior draws (the 'sample'
stream of s), so the runs are compared paired, and the spread over seeds is the sampling
noise of the metric at this N (the runs themselves are single trainings). Writes
DIR/results.json (every value per seed and the paired differences of each run against the
first), DIR/table.md and DIR/fid.png (FID against NFE, one panel per solver, one line per
run with its seed spread).
"""

import json
import os

import jax
import numpy as np
from absl import app, flags, logging

from qcsbm_jax import api, fid, restore
from qcsbm_jax.evaluation import outputs
from qcsbm_jax.experiments import nfe_quality, toy_sweep

METRICS = ("nfe", "fid", "kid", "precision", "recall", "clipped", "failed")


def parse_runs(specs: list[str]) -> dict[str, str]:
    """{'label': dir} from ['label=dir', ...]; labels unique."""
    runs = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--runs takes LABEL=DIR entries, got {spec!r}.")
        if label in runs:
            raise ValueError(f"Run label {label!r} given twice.")
        runs[label] = path
    return runs


def evaluate_runs(runs: dict[str, str], grid, num_samples: int, seeds, reference: fid.Stats,
                  params: str = "ema") -> dict[str, dict[int, list[dict]]]:
    """{label: {seed: [row per grid entry]}}; the runs share the first one's compiled
    samplers (api.Run.with_params) and one FID network."""
    template = api.load(next(iter(runs.values())), params=params)
    network = fid.FeatureNetwork(template.mesh)
    lo, hi = outputs.value_range(template.config)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    results = {}
    for label, run_dir in runs.items():
        restored, step = restore.restore_params(template.config, run_dir, template.model,
                                                template.mesh, params=params)
        run = template.with_params(restored, step, run_dir)
        results[label] = {}
        for seed in seeds:
            rows = []
            for method, overrides in grid:
                samples, info = run.sample(num_samples, method=method, seed=seed, **overrides)
                values, _ = fid.sample_metrics(
                    outputs.saved_pixels(samples, template.config), reference, network,
                    feature_samples=num_samples, label=f"{label} {method} {overrides}")
                rows.append(dict(method=method, **overrides, nfe=float(np.mean(info["nfe"])),
                                 **{m: values[m] for m in METRICS if m in values},
                                 clipped=float(np.mean(np.abs(samples - mid) > half)),
                                 failed=int((~np.isfinite(samples)).any(
                                     axis=tuple(range(1, samples.ndim))).sum())))
                logging.info("%s seed %d %s %s: %s", label, seed, method, overrides, rows[-1])
            results[label][seed] = rows
    return results


def paired_differences(per_run: dict[str, dict[int, list[dict]]], metric: str = "fid"
                       ) -> dict[str, list[dict]]:
    """Per run after the first: per grid entry, seed_statistics of (run - first run) over
    the seeds, each difference at equal seed and setting."""
    labels = list(per_run)
    first = per_run[labels[0]]
    differences = {}
    for label in labels[1:]:
        rows = []
        for i, row in enumerate(first[next(iter(first))]):
            diffs = [per_run[label][s][i][metric] - first[s][i][metric] for s in first]
            rows.append(dict(method=row["method"],
                             **{k: row[k] for k in ("num_steps", "rtol") if k in row},
                             **{metric: toy_sweep.seed_statistics(diffs)}))
        differences[f"{label} - {labels[0]}"] = rows
    return differences


def run(runs: dict[str, str], stats_path: str, workdir: str, grid, num_samples: int, seeds,
        params: str = "ema") -> dict:
    """Evaluates every run at every setting and seed; writes the outputs (module doc)."""
    os.makedirs(workdir, exist_ok=True)
    reference = fid.load_stats(stats_path)
    if reference.features is None or len(reference.features) < num_samples:
        raise ValueError(f"{stats_path} holds no features or fewer than {num_samples}: make "
                         "it with `python -m qcsbm_jax.fid stats ... --save_features`.")
    per_run = evaluate_runs(runs, grid, num_samples, seeds, reference, params)
    summary = {label: nfe_quality.summarise(per_seed, METRICS)
               for label, per_seed in per_run.items()}
    results = {"runs": runs, "stats": stats_path, "reference_images": reference.num_images,
               "num_samples": num_samples, "params": params, "seeds": list(seeds),
               "models": summary, "paired_fid": paired_differences(per_run)}
    title = f"{num_samples} samples, {params} parameters, sampling seeds {list(seeds)}"
    nfe_quality.plot(os.path.join(workdir, "fid.png"), title, summary, metric="fid",
                     ylabel="FID")
    table = nfe_quality.format_table(title, summary, METRICS)
    for name, rows in results["paired_fid"].items():
        table += "\n" + nfe_quality.format_table(f"paired FID difference: {name}",
                                                 {name: rows}, ("fid",))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write(table)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    grid = nfe_quality.settings_grid(f.methods, [int(n) for n in f.steps],
                                     [float(t) for t in f.tolerances])
    run(parse_runs(f.runs), f.stats, os.path.abspath(f.workdir), grid, f.num_samples,
        [int(s) for s in f.seeds], f.params)
    with open(os.path.join(f.workdir, "table.md")) as table:
        print(table.read())


if __name__ == "__main__":
    flags.DEFINE_list("runs", None, "LABEL=DIR of each trained image run (same network).")
    flags.DEFINE_string("stats", None, "Reference stats file with features "
                        "(python -m qcsbm_jax.fid stats ... --save_features).")
    flags.DEFINE_string("workdir", None, "Output directory.")
    flags.DEFINE_list("methods", ["euler", "heun", "dpm_solver_2m", "edm_stochastic", "pc"],
                      "Samplers.")
    flags.DEFINE_list("steps", ["10", "20", "50", "100"], "num_steps of the fixed-step samplers.")
    flags.DEFINE_list("tolerances", ["1e-2", "1e-3"], "rtol = atol of the adaptive ODE sampler.")
    flags.DEFINE_integer("num_samples", 256, "Samples per setting, run and seed.")
    flags.DEFINE_list("seeds", ["0", "1"], "Sampling seeds.")
    flags.DEFINE_enum("params", "ema", ["ema", "raw"], "EMA or raw parameters.")
    flags.mark_flags_as_required(["runs", "stats", "workdir"])
    app.run(main)
