"""The paper's CIFAR-10 training jobs compiled for accelerator targets on this machine.

    python -m benchmarks.aot_targets --targets tpu:v5e-8,gpu:h100x8 --jobs usbm,qc_jvp \
        --dtypes float32 --out benchmarks/results/aot

Each cell (job x compute dtype x target) is one `python -m qcsbm_jax.aot --train_only`
run in a subprocess, its JSON kept under --out (a cell whose JSON is there is not compiled
again, so an interrupted sweep resumes). The table then gives, per cell, the train step's
memory per chip, its estimated time (XLA's TPU cost model where it has one, else the
roofline), the flop rate that time implies as a share of the chip's peak, the QC step
against the U-NCSN++ step of the same target and dtype, the largest batch per chip, and
the paper's schedule priced with these estimates: 1.3M U-NCSN++ steps, then a 100k-step
QC fine-tune, and the seconds one compile of the step took here. All of it is compiler
estimates; docs/benchmarks.md says what they leave out.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common
from qcsbm_jax.aot import targets as targets_lib

# name: (config, overrides). The QC fine-tune of the paper's tables 3-4: one probe, batch
# 128; 'estimate' is the paper's gradient, 'jvp' the cheaper one (docs/method.md).
JOBS = {
    "usbm": ("configs/cifar10_usbm_ncsnpp.py", ()),
    "qc_estimate": ("configs/cifar10_qcsbm_ncsnpp.py:tables3_4",
                    ("--config.loss.qc_gradient=estimate",)),
    "qc_jvp": ("configs/cifar10_qcsbm_ncsnpp.py:tables3_4", ("--config.loss.qc_gradient=jvp",)),
    "ddpmpp": ("configs/cifar10_usbm_ddpmpp.py", ()),
}
PAPER_STEPS = {"usbm": 1_300_000, "qc": 100_000}  # U-NCSN++ training, then the QC fine-tune
FIND_BATCH = ("estimate", "none")


def cell_path(out: str, job: str, dtype: str, target: str, find_batch: str) -> str:
    """Where a cell's report is kept. It is not recompiled when the code changes: delete
    the file (or use another --out) to compile it again."""
    suffix = "" if find_batch == "estimate" else f"__{find_batch}"
    return os.path.join(out, f"{target.replace(':', '_')}__{job}__{dtype}{suffix}.json")


def compile_cell(out: str, job: str, dtype: str, target: str, find_batch: str,
                 timeout: float, cached_only: bool = False) -> dict | None:
    """The cell's report (compiling it unless its JSON exists or cached_only), with
    'compile_wall_s'; None if it is not there or did not compile."""
    path = cell_path(out, job, dtype, target, find_batch)
    # A cell with the batch search also serves a request without it; --cached_only
    # takes either.
    kinds = (find_batch, *FIND_BATCH) if cached_only else (find_batch, "estimate")
    for kind in dict.fromkeys(kinds):
        if os.path.exists(found := cell_path(out, job, dtype, target, kind)):
            with open(found) as f:
                return json.load(f)
    if cached_only:
        return None
    config, overrides = JOBS[job]
    command = [sys.executable, "-m", "qcsbm_jax.aot", f"--config={config}",
               f"--target={target}", "--train_only", f"--find_batch={find_batch}",
               f"--json={path}.partial", f"--config.training.compute_dtype={dtype}",
               *overrides]
    print(f"compiling {job} {dtype} for {target} ...", flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"    not finished in {timeout:.0f} s; skipped", flush=True)
        return None
    wall = time.perf_counter() - start
    if result.returncode not in (0, 3):
        print(f"    failed (exit {result.returncode}):\n{result.stderr[-2000:]}", flush=True)
        return None
    with open(path + ".partial") as f:
        report = json.load(f)
    report["compile_wall_s"] = wall
    common.write_json(path, report)
    os.remove(path + ".partial")
    print(f"    {wall:.0f} s", flush=True)
    return report


def summary(job: str, dtype: str, report: dict, baseline: dict | None) -> dict:
    """One table row of a cell's report (baseline: the U-NCSN++ cell of its target/dtype)."""
    step = report["programs"][0]
    chip = targets_lib.parse(report["target"]).chip
    seconds = step["estimated_seconds"]
    row = dict(target=report["target"], job=job, dtype=dtype,
               gib_per_chip=step["memory_total"] / 2**30, fits=step["fits"],
               step_s=seconds, estimate="XLA" if step["xla_seconds"] else "roofline",
               tflop_per_chip=step["flops"] / 1e12,
               share_of_peak=step["flops"] / seconds / chip.peak_flops[dtype],
               largest_batch_per_chip=(report["fit"] or {}).get("per_device_batch"),
               compile_s=step.get("compile_seconds"))
    if baseline is not None and job.startswith("qc"):
        usbm_s = baseline["programs"][0]["estimated_seconds"]
        row["vs_usbm"] = seconds / usbm_s
        hours = (PAPER_STEPS["usbm"] * usbm_s + PAPER_STEPS["qc"] * seconds) / 3600
        row["paper_schedule_h"] = hours
        row["paper_chip_hours"] = hours * report["num_chips"]
    return row


COLUMNS = ["target", "job", "dtype", "gib_per_chip", "fits", "step_s", "estimate",
           "tflop_per_chip", "share_of_peak", "vs_usbm", "largest_batch_per_chip",
           "paper_schedule_h", "paper_chip_hours", "compile_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="tpu:v4-8,tpu:v5e-8,tpu:v5p-8,tpu:v6e-8,gpu:h100x8")
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--find_batch", default="estimate", choices=FIND_BATCH)
    parser.add_argument("--timeout", type=float, default=3 * 3600,
                        help="Seconds one cell may compile.")
    parser.add_argument("--out", default="benchmarks/results/aot")
    parser.add_argument("--json", default="", help="Where to write the table's rows.")
    parser.add_argument("--cached_only", action="store_true",
                        help="Compile nothing: the table of the cells already under --out.")
    args = parser.parse_args()
    for name in args.targets.split(","):
        targets_lib.parse(name)  # A misspelt target fails before any compile.
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for target in args.targets.split(","):
        for dtype in args.dtypes.split(","):
            reports = {job: compile_cell(args.out, job, dtype, target, args.find_batch,
                                         args.timeout, args.cached_only)
                       for job in args.jobs.split(",")}
            rows += [summary(job, dtype, r, reports.get("usbm"))
                     for job, r in reports.items() if r is not None]
    print(common.markdown_table(rows, COLUMNS))
    common.write_json(args.json or None, rows)


if __name__ == "__main__":
    main()
