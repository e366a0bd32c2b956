"""Experiment 2 of docs/method.md: every toy data set x model family x seed, trained, evaluated
and tabulated.

    python -m qcsbm_jax.experiments.toy_sweep --workdir DIR
        [--datasets gaussians8,spirals2,checkerboard] [--families csbm,usbm,qcsbm]
        [--seeds 0,1,2] [--variant smoke] [--override training.num_steps=20 ...]
        [--ema_decay 0.995] [--aggregate_only]

Runs. Each (dataset, family, seed) is trained with train.train and evaluated with
evaluation.runner.evaluate in this process, into DIR/<dataset>_<family>_seed<k>: the files of
`qcsbm_jax.main --mode train` then `--mode eval` in that directory, plus wall_time.json
(train_s, eval_s: seconds, compilation included). With --ema_decay d > 0 the runs also
keep an EMA of the weights (it does not change training) and are evaluated twice: the
final weights into eval/ (the paper's protocol) and the EMA weights into eval_ema/ (a
protocol less at the mercy of step-to-step noise). A run whose metrics all exist is
skipped and a partly trained one resumes from its newest checkpoint, so rerunning the same
command continues an interrupted sweep (a resumed run's train_s covers only the resumed part).
All configs are built before any training, so a bad --override fails at once.

Seeds. Seed k sets config.seed = k (network initialisation, per-step noise and times) and
data.seed = k (the training set of data.num_points points and the batch order): a seed
replicates the whole training procedure, so the spread over seeds includes the variability
of a finite training set, as in a reproduction from scratch. Families share the training set
and batches at equal seeds, a paired comparison. The evaluation (eval.seed: test points,
noise draws, ODE prior samples) is the same for every run. Overrides apply after the seeds:
--override data.seed=0 trains every seed on one training set.

Aggregation (after the sweep, or alone with --aggregate_only) covers every complete run in
DIR, whatever command made it. DIR/results.json holds, per data set and family, the seeds
and, for each of METRICS, the per-seed values, their mean and their sample standard
deviation (ddof 1; null for a single seed). DIR/table.md has one markdown table per data set
(rows: families; cells: mean ± std), which is also printed; results_ema.json and
table_ema.md the same for the EMA protocol when its evaluations exist. DIR/samples_seed<k>.png tiles
the sample plots of seed k's runs once all nine are complete.
"""

import ast
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image

from qcsbm_jax import config as config_lib, plotting
from qcsbm_jax.data.toy import TOY_DATASETS

METRICS = ("asym", "nasym", "score_error", "nll", "precision", "recall", "nfe",
           "train_s", "eval_s")
WALL_TIME_FILE = "wall_time.json"
PROTOCOLS = {"eval": ("raw", ""), "eval_ema": ("ema", "_ema")}  # output dir: params, suffix
_RUN_NAME = re.compile(
    rf"({'|'.join(TOY_DATASETS)})_({'|'.join(config_lib.TOY_FAMILIES)})_seed(\d+)")

RunKey = tuple[str, str, int]  # (dataset, family, seed)


def run_name(dataset: str, family: str, seed: int) -> str:
    return f"{dataset}_{family}_seed{seed}"


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value), the value a Python literal where it parses as one."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--override wants key=value, e.g. training.num_steps=20; got {text!r}.")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run_config(dataset: str, family: str, seed: int, variant: str | None = None,
               overrides: tuple[str, ...] = (), ema_decay: float = 0.0
               ) -> ml_collections.ConfigDict:
    """toy_config with the seeds and EMA set (module doc), then overrides, validated."""
    config = config_lib.toy_config(dataset, family, variant)
    config.seed = seed
    config.data.seed = seed
    config.optim.ema_decay = ema_decay
    config.update_from_flattened_dict(dict(parse_override(o) for o in overrides))
    config_lib.validate(config)
    return config


def sweep_configs(datasets, families, seeds, variant: str | None = None,
                  overrides: tuple[str, ...] = (), ema_decay: float = 0.0
                  ) -> dict[str, ml_collections.ConfigDict]:
    """Run name -> config for every (dataset, family, seed)."""
    return {run_name(d, f, s): run_config(d, f, s, variant, overrides, ema_decay)
            for d in datasets for f in families for s in seeds}


def _metrics_path(run_dir: str, output_dir: str = "eval") -> str:
    return os.path.join(run_dir, output_dir, "metrics.json")


def _protocols(config: ml_collections.ConfigDict) -> list[str]:
    """The evaluation output dirs of a run: eval, and eval_ema when it keeps an EMA."""
    return ["eval", "eval_ema"] if config.optim.ema_decay > 0 else ["eval"]


def _write_json(path: str, values: dict) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(values, f, indent=2)


def run_one(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, float] | None:
    """Trains (or resumes) and evaluates one run (once per protocol); its wall times, or
    None if already complete."""
    protocols = _protocols(config)
    if all(os.path.exists(_metrics_path(run_dir, p)) for p in protocols):
        return None
    # Imported here so that aggregation alone does not load the training stack.
    from qcsbm_jax import train
    from qcsbm_jax.evaluation import runner

    os.makedirs(run_dir, exist_ok=True)
    start = time.perf_counter()
    train.train(config, run_dir)
    trained = time.perf_counter()
    for output_dir in protocols:
        protocol = config.copy_and_resolve_references()
        protocol.eval.update(params=PROTOCOLS[output_dir][0], output_dir=output_dir)
        runner.evaluate(protocol, run_dir)
    times = {"train_s": trained - start, "eval_s": time.perf_counter() - trained}
    _write_json(os.path.join(run_dir, WALL_TIME_FILE), times)
    return times


def run_sweep(workdir: str, configs: dict[str, ml_collections.ConfigDict]) -> dict[str, dict]:
    """Runs each config into workdir/<name>; the wall times of the runs done now (not skipped)."""
    done = {}
    for name, config in configs.items():
        times = run_one(config, os.path.join(workdir, name))
        if times is None:
            logging.info("%s: complete, skipped.", name)
        else:
            logging.info("%s: trained in %.1f s, evaluated in %.1f s.", name,
                         times["train_s"], times["eval_s"])
            done[name] = times
    return done


def load_runs(workdir: str, output_dir: str = "eval") -> dict[RunKey, dict[str, float]]:
    """(dataset, family, seed) -> METRICS values of every run directory in workdir with
    metrics in output_dir."""
    runs = {}
    for name in sorted(os.listdir(workdir)):
        match = _RUN_NAME.fullmatch(name)
        run_dir = os.path.join(workdir, name)
        if not match or not os.path.exists(_metrics_path(run_dir, output_dir)):
            continue
        with open(_metrics_path(run_dir, output_dir)) as f:
            values = json.load(f)
        wall_time = os.path.join(run_dir, WALL_TIME_FILE)
        if os.path.exists(wall_time):
            with open(wall_time) as f:
                values.update(json.load(f))
        dataset, family, seed = match.groups()
        runs[dataset, family, int(seed)] = {k: values[k] for k in METRICS if k in values}
    return runs


def seed_statistics(values: list[float | None]) -> dict:
    """Mean and sample std (ddof 1) of the values that are not None; None where undefined."""
    present = [v for v in values if v is not None]
    return {"mean": float(np.mean(present)) if present else None,
            "std": float(np.std(present, ddof=1)) if len(present) > 1 else None,
            "values": values}


def aggregate(runs: dict[RunKey, dict[str, float]]) -> dict:
    """{dataset: {family: {'seeds': [...], metric: seed_statistics}}}, in the paper's order."""
    order = {name: i for i, name in enumerate((*TOY_DATASETS, *config_lib.TOY_FAMILIES))}
    results: dict = {}
    for dataset, family, seed in sorted(runs, key=lambda k: (order[k[0]], order[k[1]], k[2])):
        results.setdefault(dataset, {}).setdefault(family, {"seeds": []})["seeds"].append(seed)
    for dataset, families in results.items():
        for family, entry in families.items():
            seed_values = [runs[dataset, family, s] for s in entry["seeds"]]
            entry.update({m: seed_statistics([v.get(m) for v in seed_values]) for m in METRICS})
    return results


def format_cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.4g}"
    return f"{stats['mean']:.4g} ± {stats['std']:.2g}"


def format_tables(results: dict) -> str:
    """One markdown table per data set: rows families, columns seeds and METRICS."""
    lines = ["Mean ± sample std over seeds. nll in nats; train_s, eval_s in wall seconds."]
    for dataset, families in results.items():
        lines += ["", f"## {dataset}", "", "| family | seeds | " + " | ".join(METRICS) + " |",
                  "|---" * (len(METRICS) + 2) + "|"]
        for family, entry in families.items():
            cells = [family, ",".join(map(str, entry["seeds"]))]
            cells += [format_cell(entry[m]) for m in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_sample_figure(workdir: str, seed: int) -> str | None:
    """Tiles the eval/samples.png of one seed's runs into DIR/samples_seed<k>.png (rows:
    data sets, columns: families); None unless all of them are complete."""
    paths = [os.path.join(workdir, run_name(d, f, seed), "eval", "samples.png")
             for d in TOY_DATASETS for f in config_lib.TOY_FAMILIES]
    if not all(os.path.exists(p) for p in paths):
        return None
    tiles = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return plotting.image_grid_png(os.path.join(workdir, f"samples_seed{seed}.png"),
                                   tiles / 255.0, ncols=len(config_lib.TOY_FAMILIES))


def write_summary(workdir: str) -> str:
    """Aggregates the complete runs in workdir into results.json and table.md (and
    results_ema.json, table_ema.md), tiles each seed's sample plots
    (write_sample_figure); returns the tables."""
    tables = []
    for output_dir, (_, suffix) in PROTOCOLS.items():
        runs = load_runs(workdir, output_dir)
        if not runs and suffix:
            continue
        results = aggregate(runs)
        table = format_tables(results)
        tables.append(f"# Protocol: {output_dir}/\n\n{table}" if suffix else table)
        _write_json(os.path.join(workdir, f"results{suffix}.json"), results)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"table{suffix}.md"), "w") as f:
                f.write(table)
    if jax.process_index() == 0:
        for seed in sorted({seed for _, _, seed in load_runs(workdir)}):
            write_sample_figure(workdir, seed)
    return "\n".join(tables)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    workdir = os.path.abspath(FLAGS.workdir)
    os.makedirs(workdir, exist_ok=True)
    if not FLAGS.aggregate_only:
        configs = sweep_configs(FLAGS.datasets, FLAGS.families, [int(s) for s in FLAGS.seeds],
                                FLAGS.variant, tuple(FLAGS.override), FLAGS.ema_decay)
        run_sweep(workdir, configs)
    print(write_summary(workdir))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per run.")
    flags.DEFINE_list("datasets", list(TOY_DATASETS), "Toy data sets.")
    flags.DEFINE_list("families", list(config_lib.TOY_FAMILIES), "Model families.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed and data.seed).")
    flags.DEFINE_enum("variant", None, ["smoke"], "Config variant; default: the paper's.")
    flags.DEFINE_multi_string("override", [], "key=value config override, repeatable.")
    flags.DEFINE_bool("aggregate_only", False, "Only aggregate the complete runs in --workdir.")
    flags.DEFINE_float("ema_decay", 0.0, "Keep an EMA of the weights with this decay and "
                       "also evaluate it (eval_ema/); 0: no EMA.")
    flags.register_validator("seeds", lambda seeds: all(s.isdigit() for s in seeds),
                             "--seeds must be non-negative integers, e.g. 0,1,2.")
    flags.mark_flag_as_required("workdir")
    app.run(main)
