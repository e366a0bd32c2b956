"""The benchmark suite: runs the sections of every (device count, model) and prints their
tables (python -m benchmarks.run parses the flags; docs/benchmarks.md explains every
column).

Sections, each in its own module, each timing the program users run:
  train       benchmarks.training: one train step per loss variant, as train.train builds it
  gradnoise   benchmarks.training: probe noise of the penalty's parameter gradient
  score       benchmarks.sampling: one score-network evaluation, the samplers' unit cost
  pc, ode     benchmarks.sampling: the samplers of sampling.registry.make_sampler
  likelihood  benchmarks.likelihood: NLL by evaluation.programs.make_nll_fn
  accuracy    benchmarks.accuracy: bfloat16 against float32 for the QC penalty estimate
Every config gets the run's --override values first (the train variants then set their
loss settings). Networks are freshly initialised and image data are uniform noise:
timings do not depend on training, ODE NFE does (trained models need other NFE).
"""

import argparse
import os
import time
from collections.abc import Callable

from benchmarks import accuracy, common, likelihood, sampling, training

COLUMNS = {
    "train": ["model", "devices", "batch", "variant", "compile_s", "memory_mb",
              "device_peak_mb", "gflops", "flop_ratio", "step_ms", "examples_per_s",
              "ratio_to_dsm", "tflops_per_s", "of_peak"],
    "score": ["model", "devices", "batch", "compile_s", "call_ms", "examples_per_s"],
    "pc": ["model", "devices", "batch", "steps", "nfe_mean", "compile_s", "run_s",
           "steps_per_s", "score_evals_per_s"],
    "ode": ["model", "devices", "batch", "rtol", "nfe_mean", "nfe_max", "compile_s",
            "run_s", "s_per_1000"],
    "likelihood": ["model", "devices", "batch", "divergence", "rtol", "nfe_mean",
                   "nfe_max", "compile_s", "run_s", "s_per_1000"],
    "gradnoise": ["model", "batch", "qc_gradient", "draws", "rel_noise", "mean_gap"],
    "accuracy": ["model", "batch", "dtype", "nasym", "probe_noise", "low_vs_f32",
                 "batch_mean_low_vs_f32", "batch_mean_f32_vs_exact"],
}
SECTIONS = tuple(COLUMNS)


def _train_variants(bench: common.Bench, requested: list[str] | None) -> list[str]:
    """The requested variants the model runs (default: its own), DSM first (the ratios'
    reference)."""
    unknown = sorted(set(requested or ()) - set(training.VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from "
                         f"{list(training.VARIANTS)}.")
    own = bench.spec.variants or tuple(training.VARIANTS)
    variants = [v for v in (requested or own) if v in own]
    return ["dsm"] + [v for v in variants if v != "dsm"]


def run_model(name: str, n_devices: int, args: argparse.Namespace,
              report: Callable[[list[dict]], None]) -> list[dict]:
    """All sections of one model; report(rows) gets every row measured so far, as it
    grows (section by section, train variant by variant and round by round)."""
    bench = common.make_bench(name, n_devices, args.quick, args.override)
    sizes = bench.sizes
    sample_batch = common.round_up(sizes.sample_batch, n_devices)
    rows = []

    def finish(section_rows: list[dict]) -> list[dict]:
        """Adds the run's tier and the fraction of --peak_tflops achieved."""
        return [dict(row, tier=bench.tier,
                     **({"of_peak": row["tflops_per_s"] / args.peak_tflops}
                        if args.peak_tflops and row.get("tflops_per_s") else {}))
                for row in section_rows]

    if "train" in args.sections:
        variants = _train_variants(bench, args.variants)
        for batch in args.batch or sizes.train_batches:
            rows += finish(training.bench_train(
                bench, common.round_up(batch, n_devices), variants,
                args.rounds or (2 if args.quick else 5),
                lambda partial: report(rows + finish(partial))))
    sections = dict(
        score=lambda: sampling.bench_score(bench, sample_batch),
        pc=lambda: sampling.bench_pc(bench, sample_batch, sizes.pc_steps),
        ode=lambda: sampling.bench_ode(bench, sample_batch),
        likelihood=lambda: likelihood.bench_likelihood(bench, sample_batch),
        accuracy=lambda: accuracy.bench_accuracy(bench, sizes.accuracy_batch),
        gradnoise=lambda: training.bench_gradient_noise(bench, sizes.accuracy_batch,
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


def main(args: argparse.Namespace) -> dict:
    """Runs every (device count, model) in turn and prints each one's tables as it
    finishes; --json is rewritten whenever a row is added or updated (each compiled
    train variant, each timed round, each section), so a run cut short keeps them."""
    for name in args.models:  # A bad override fails before anything runs.
        try:
            common.apply_overrides(common.MODELS[name].config(), args.override)
        except ValueError as error:
            raise SystemExit(f"{name}: {error}") from None
    start = common.machine()
    common.print_machine(start)
    if args.override:
        print(f"# overrides: {' '.join(args.override)}", flush=True)
    result = dict(args=vars(args), machine=start, rows=[])

    def save(rows: list[dict]) -> None:
        common.write_json(args.json, dict(result, rows=result["rows"] + rows,
                                          load_average_end=os.getloadavg()))

    for n_devices in args.devices:
        for name in args.models:
            rows = run_model(name, n_devices, args, save)
            result["rows"] += rows
            result["load_average_end"] = os.getloadavg()
            for section, columns in COLUMNS.items():
                section_rows = [r for r in rows if r["section"] == section]
                if section_rows:
                    print(f"\n## {section}: {name}, {n_devices} device(s)\n\n"
                          f"{common.markdown_table(section_rows, columns)}", flush=True)
            print(f"\nload average now: {result['load_average_end']}\n", flush=True)
            save([])
    return result
