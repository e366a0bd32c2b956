"""Throughput of FID's Inception network and the time of the scores (docs/fid.md).

  python -m benchmarks.inception                         # batches 8,32,64 on one device
  python -m benchmarks.inception --batch 256,1024 --devices 1 --json out.json

Rows of the table:
  network   first call (compilation included), time per call and images/s of the
            jitted, sharded feature network (resize of 32 x 32 x 3 uint8 images to 299,
            then Inception-v3) per batch; cpu_s and images_per_cpu_s count this process's
            CPU time (on a shared machine the wall time also counts other processes' turns)
  stats     float64 accumulation of mean and covariance, s per 1,000 images
  fid_numpy, fid_xla
            the FID formula on 2048-dimensional statistics (once per evaluation) in
            float64 through NumPy and through XLA on the default device (compilation
            included); scores.fid takes XLA, or NumPy under a TPU
  kid, pr   KID (100 subsets of 1,000), precision/recall + density/coverage, 1,000
            features a side (once per evaluation)
and `fid_s_per_1000`: seconds of feature extraction and statistics per 1,000 samples at
the fastest batch (add the fixed fid/kid/pr costs once). Weights come from
qcsbm_jax.fid.weights.load (random inputs; the time does not depend on the values).
"""

import argparse
import os
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inception",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", default="8,32,64",
                        help="comma-separated global batches (multiples of --devices)")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices of the mesh (CPU: virtual devices)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch")
    parser.add_argument("--skip_scores", action="store_true",
                        help="time the network only (not stats, fid, kid, pr)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    return parser.parse_args(argv)


def _timed(fn, repeats: int) -> tuple[float, float, float]:
    """(first call's wall s, median wall s, median CPU s of this process) of the `repeats`
    calls after the first, or of the first alone when repeats is 0. CPU time is what a
    loaded machine inflates less."""
    import jax
    import numpy as np
    runs = []
    for _ in range(1 + repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        runs.append((time.perf_counter() - start, time.process_time() - start_cpu))
    timed = np.array(runs[1:] or runs)
    return runs[0][0], float(np.median(timed[:, 0])), float(np.median(timed[:, 1]))


def network_rows(batches: list[int], devices: int, repeats: int) -> list[dict]:
    import jax
    import numpy as np
    from qcsbm_jax import parallel
    from qcsbm_jax.fid import pipeline
    mesh = parallel.make_mesh(devices=jax.devices()[:devices])
    rows = []
    for batch in batches:
        network = pipeline.FeatureNetwork(mesh, batch_size=batch)
        pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), np.uint8)
        first, call, cpu = _timed(lambda: network(pixels)["pool_3"], repeats)
        rows.append(dict(row="network", devices=devices, batch=batch, first_s=first,
                         call_s=call, cpu_s=cpu, images_per_s=batch / call,
                         images_per_cpu_s=batch / cpu))
        print(f"  network batch {batch}: {batch / call:.3g} images/s", flush=True)
    return rows


def score_rows(repeats: int) -> list[dict]:
    import numpy as np
    from qcsbm_jax import metrics
    from qcsbm_jax.fid import scores, statistics
    rng = np.random.default_rng(0)
    real = rng.gamma(1.0, 0.3, (1000, 2048)).astype(np.float32)  # pool_3-like: >= 0
    fake = rng.gamma(1.0, 0.35, (1000, 2048)).astype(np.float32)
    sums, other = statistics.FeatureStats.empty(), statistics.FeatureStats.empty()
    other.add(fake)
    _, wall, cpu = _timed(lambda: sums.add(real), repeats)
    rows = [dict(row="stats", run_s=wall, cpu_s=cpu, s_per_1000=wall)]
    sigma_a = sums.sigma + 1e-3 * np.eye(2048)  # full rank, as 50,000 images give
    sigma_b = other.sigma + 1e-3 * np.eye(2048)
    for row, on_device in (("fid_numpy", False), ("fid_xla", True)):
        first, wall, cpu = _timed(lambda: scores.fid(sums.mu, sigma_a, other.mu, sigma_b,
                                                     on_device=on_device), 0)
        rows.append(dict(row=row, run_s=wall, cpu_s=cpu))
    first, wall, cpu = _timed(lambda: scores.kid(real, fake), 0)
    rows.append(dict(row="kid", run_s=wall, cpu_s=cpu))

    def pr_dc():
        return (*metrics.precision_recall(real, fake, k=3),
                *metrics.density_coverage(real, fake, k=5))

    first, wall, cpu = _timed(pr_dc, repeats)
    rows.append(dict(row="pr", first_s=first, run_s=wall, cpu_s=cpu))
    for row in rows:
        print(f"  {row['row']}: {row}", flush=True)
    return rows


COLUMNS = ("row", "devices", "batch", "first_s", "call_s", "run_s", "cpu_s", "images_per_s",
           "images_per_cpu_s", "s_per_1000")


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))  # before jax's import
    from benchmarks import common
    machine = common.machine()
    common.print_machine(machine)
    rows = network_rows([int(b) for b in args.batch.split(",")], args.devices, args.repeats)
    if not args.skip_scores:
        rows += score_rows(args.repeats)
    best = max(r["images_per_s"] for r in rows if r["row"] == "network")
    stats = next((r["s_per_1000"] for r in rows if r["row"] == "stats"), 0.0)
    result = dict(args=vars(args), machine=machine, rows=rows,
                  fid_s_per_1000=1000 / best + stats, load_average_end=os.getloadavg())
    print(f"\n{common.markdown_table(rows, COLUMNS)}\n\n"
          "fid_s_per_1000 (features + stats, fastest batch): "
          f"{result['fid_s_per_1000']:.3g}; load average now {result['load_average_end']}")
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
