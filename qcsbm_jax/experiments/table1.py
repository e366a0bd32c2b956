"""The paper's Table 1 (2D NLL per family), reproduced honestly: ours against the authors'
code, with the spread of both and paired family comparisons.

    python -m qcsbm_jax.experiments.table1 --ours runs/table1 --official runs/official \
        --out docs/results/table1 [--metric nll]

--ours is a toy sweep (experiments/toy_sweep.py, with --ema_decay for the EMA protocol);
--official holds runs of the authors' 2D code evaluated by ours (reference/), named like a
sweep's (<data>_<family>_seed<k>, eval/ and eval_ema/). For each protocol (eval: the final
weights, the paper's; eval_ema: an EMA of the weights) and data set:

  per family  paper (where its Table 1 is restated below), official and ours: mean,
              sample std, n, per-run values; difference of means (ours - official), its
              standard error sqrt(s1^2/n1 + s2^2/n2), and whether |diff| < 2 SE
  paired      QCSBM - USBM and CSBM - USBM at equal seeds (same training set and batches,
              and for ours the same initialisation): mean, std, n and how many are < 0

Writes OUT/results.json and OUT/table.md (also printed).
"""

import json
import math
import os

import numpy as np
from absl import app, flags

from qcsbm_jax.experiments import toy_sweep

# The paper's Table 1 as quoted to us (8 Gaussians, NLL in nats, mean ± std of 3 runs).
PAPER = {("gaussians8", "usbm"): (5.02, 0.03), ("gaussians8", "qcsbm"): (5.01, 0.09)}
FAMILIES = ("csbm", "usbm", "qcsbm")


def summary(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values), "values": values}


def difference(ours: dict, official: dict) -> dict | None:
    """ours - official of the means, its standard error and whether it is within 2 SE."""
    if not (ours["n"] > 1 and official["n"] > 1):
        return None
    diff = ours["mean"] - official["mean"]
    se = math.sqrt(ours["std"] ** 2 / ours["n"] + official["std"] ** 2 / official["n"])
    return {"diff": diff, "se": se, "within_2se": abs(diff) < 2 * se}


def paired(runs: dict, dataset: str, family: str, baseline: str, metric: str) -> dict:
    """family - baseline at every seed both have."""
    seeds = sorted(s for d, f, s in runs if d == dataset and f == family
                   and (dataset, baseline, s) in runs)
    diffs = [runs[dataset, family, s][metric] - runs[dataset, baseline, s][metric]
             for s in seeds]
    return dict(summary(diffs), seeds=seeds, below_zero=sum(d < 0 for d in diffs))


def tabulate(ours_dir: str, official_dir: str, metric: str = "nll") -> dict:
    results = {}
    for output_dir in toy_sweep.PROTOCOLS:
        ours = toy_sweep.load_runs(ours_dir, output_dir)
        official = toy_sweep.load_runs(official_dir, output_dir) if official_dir else {}
        if not ours:
            continue
        protocol = results.setdefault(output_dir, {})
        for dataset in sorted({d for d, _, _ in ours}):
            entry = protocol.setdefault(dataset, {"families": {}, "paired": {}})
            for family in FAMILIES:
                mine = summary([v[metric] for (d, f, _), v in sorted(ours.items())
                                if (d, f) == (dataset, family)])
                theirs = summary([v[metric] for (d, f, _), v in sorted(official.items())
                                  if (d, f) == (dataset, family)])
                entry["families"][family] = {
                    "paper": PAPER.get((dataset, family)) if output_dir == "eval" else None,
                    "official": theirs, "ours": mine, "ours_minus_official":
                        difference(mine, theirs)}
            for source, runs in (("ours", ours), ("official", official)):
                entry["paired"][source] = {
                    f"{f}-usbm": paired(runs, dataset, f, "usbm", metric)
                    for f in ("qcsbm", "csbm")}
    return results


def _cell(stats: dict | None) -> str:
    if not stats or stats["mean"] is None:
        return "-"
    std = f" ± {stats['std']:.3f}" if stats["std"] is not None else ""
    return f"{stats['mean']:.3f}{std} (n={stats['n']})"


def format_table(results: dict, metric: str) -> str:
    lines = []
    for output_dir, datasets in results.items():
        label = ("final weights (the paper's protocol)" if output_dir == "eval"
                 else "EMA of the weights")
        for dataset, entry in datasets.items():
            lines += ["", f"### {dataset}, {metric}: {label}", "",
                      "| family | paper | official code | ours | ours - official (2 SE) |",
                      "|---|---|---|---|---|"]
            for family, row in entry["families"].items():
                paper = f"{row['paper'][0]:.2f} ± {row['paper'][1]:.2f}" if row["paper"] else "-"
                diff = row["ours_minus_official"]
                diff = (f"{diff['diff']:+.3f} ({2 * diff['se']:.3f}): "
                        f"{'within' if diff['within_2se'] else 'outside'}" if diff else "-")
                lines.append(f"| {family} | {paper} | {_cell(row['official'])} | "
                             f"{_cell(row['ours'])} | {diff} |")
            lines += ["", "| paired at equal seeds | source | mean ± std (n) | below 0 |",
                      "|---|---|---|---|"]
            for source, comparisons in entry["paired"].items():
                for name, stats in comparisons.items():
                    if stats["n"]:
                        lines.append(f"| {name} | {source} | {_cell(stats)} | "
                                     f"{stats['below_zero']} of {stats['n']} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    results = tabulate(f.ours, f.official, f.metric)
    table = format_table(results, f.metric)
    os.makedirs(f.out, exist_ok=True)
    with open(os.path.join(f.out, "results.json"), "w") as out:
        json.dump(results, out, indent=1)
    with open(os.path.join(f.out, "table.md"), "w") as out:
        out.write(table)
    print(table)


if __name__ == "__main__":
    flags.DEFINE_string("ours", None, "Our toy sweep directory.")
    flags.DEFINE_string("official", "", "Runs of the authors' code evaluated by ours.")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_string("metric", "nll", "The metric to tabulate.")
    flags.mark_flags_as_required(["ours", "out"])
    app.run(main)
