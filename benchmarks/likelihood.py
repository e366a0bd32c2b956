"""The likelihood section: NLL by the probability-flow ODE, as evaluation computes it.

api.Run.log_likelihood, i.e. evaluation.programs.make_nll_fn with config.eval's divergence
and tolerances (the program of `--mode eval` and qcsbm_jax.load(...).log_likelihood):
toy points in float32, images as 8-bit pixels, uniformly dequantized (bits/dim).
"""

import numpy as np

from benchmarks import common
from benchmarks.sampling import quick_tolerances


def bench_likelihood(bench: common.Bench, batch: int) -> list[dict]:
    rtol, atol = quick_tolerances(bench, bench.config.eval)
    run = bench.user_run(batch, **{"eval.rtol": rtol, "eval.atol": atol})
    x = bench.data(batch, seed=2)
    if bench.is_image:  # 8-bit pixels from the data in the model's range
        low = -1.0 if bench.config.data.centered else 0.0
        x = np.round((x - low) / (1.0 - low) * 255).astype(np.uint8)
    likelihood = lambda: run.log_likelihood(x)
    result, first_s = common.timed_first_call(likelihood)
    run_s = common.median_seconds(likelihood, 1)
    nfe = np.asarray(result["nfe"])
    return [bench.row("likelihood", batch=batch, divergence=run.config.eval.divergence,
                      rtol=rtol, atol=atol, nfe_mean=float(nfe.mean()),
                      nfe_max=int(nfe.max()), compile_s=first_s - run_s, run_s=run_s,
                      s_per_1000=1000 * run_s / batch)]
