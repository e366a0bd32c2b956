"""The separable FIR resampling against the 2D depthwise convolution it replaced, side by side.

    python -m benchmarks.fir_resampling --batch 16 --rounds 5

One process, one NCSN++ (image_config("cifar10", "usbm", "small")), one DSM train step
compiled twice: with layers.upfirdn2d as it is (1D taps: shifted, strided slices per
axis) and with the FIR taps turned back into the 2D kernel outer(taps, taps) (one
depthwise lax.conv_general_dilated, the code before). Rounds are interleaved, so a change
of load on a shared machine hits both alike; prints per-step seconds per round and the
ratio new / old (median and range), and the largest difference of the two steps'
losses on the same state.
"""

import argparse
import statistics
import time
from unittest import mock

import jax
import numpy as np

from qcsbm_jax import config as config_lib, experiment, losses, train
from qcsbm_jax.models import layers

_upfirdn2d = layers.upfirdn2d


def _with_2d_kernel(x, kernel, **kwargs):
    """upfirdn2d through the 2D depthwise convolution (the code before the separable path)."""
    taps = np.asarray(kernel)
    return _upfirdn2d(x, np.outer(taps, taps) if taps.ndim == 1 else taps, **kwargs)


def _compiled_step(config, batch, separable: bool):
    model = experiment.build_score_model(config)
    loss_fn = losses.make_loss_fn(model.score_fn, model.sde, **config.loss)
    optimizer = train.make_optimizer(config.optim)
    state = train.init_state(jax.tree.map(np.asarray, model.init_params), optimizer, 0)
    step = jax.jit(train.make_train_step(loss_fn, optimizer, config.optim.ema_decay))
    with mock.patch.object(layers, "upfirdn2d", _upfirdn2d if separable else _with_2d_kernel):
        compiled = step.lower(state, batch).compile()  # Traced here, with the patch on.
    return compiled, state


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fir_resampling")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="train steps per round")
    args = parser.parse_args()
    config = config_lib.image_config("cifar10", "usbm", "small")
    batch = jax.random.uniform(jax.random.key(0), (args.batch, 32, 32, 3))
    steps = {name: _compiled_step(config, batch, name == "separable")
             for name in ("separable", "conv2d")}
    losses_of = {name: float(step(state, batch)[1]["loss"]) for name, (step, state) in
                 steps.items()}  # Warm-up, and the same loss both ways.
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, (step, state) in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                out = step(state, batch)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.steps)
        print({k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    ratios = [a / b for a, b in zip(times["separable"], times["conv2d"])]
    for name, values in times.items():
        print(f"{name}: median step {statistics.median(values):.3f} s "
              f"({min(values):.3f}-{max(values):.3f})")
    print(f"separable / conv2d: {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}); losses {losses_of}")


if __name__ == "__main__":
    main()
