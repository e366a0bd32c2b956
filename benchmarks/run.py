"""Command line of the benchmark suite (benchmarks/suite.py); docs/benchmarks.md shows use.

  python -m benchmarks.run --quick                      # seconds to minutes, any machine
  python -m benchmarks.run --models toy,ncsnpp_small --devices 1,8 --json out.json
  python -m benchmarks.run --models ncsnpp_small --sections train \
      --override model.progressive_input=input_skip     # any config value, typed

Parses the flags and asks XLA's CPU backend for as many virtual devices as the largest
entry of --devices before jax is imported (JAX_NUM_CPU_DEVICES; an existing setting wins;
accelerators are used as they are).
"""

import argparse
import os
import sys

# suite.SECTIONS and common.MODELS, named here: importing those imports jax.
SECTIONS = ("train", "score", "pc", "ode", "likelihood", "gradnoise", "accuracy")
MODELS = ("toy", "ncsnpp_smoke", "ncsnpp_small", "ncsnpp_deep")


def _csv(kind):
    def parse(text):
        return [kind(item) for item in text.split(",") if item]
    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", type=_csv(str), default=["toy", "ncsnpp_small"],
                        help=f"comma-separated, from {MODELS}")
    parser.add_argument("--sections", type=_csv(str), default=list(SECTIONS),
                        help=f"comma-separated, from {SECTIONS}")
    parser.add_argument("--variants", type=_csv(str), default=None,
                        help="train-step variants (default: all for the model; 'dsm', "
                             "the reference of the ratios, always runs); see training.VARIANTS")
    parser.add_argument("--devices", type=_csv(int), default=[1],
                        help="device counts to run on, e.g. 1,8 (the first N devices)")
    parser.add_argument("--batch", type=_csv(int), default=None,
                        help="train batch sizes (default: per model and backend; raised to "
                             "a multiple of the device count)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value for every benchmarked config, typed as the "
                             "main program's --config.KEY=VALUE (repeatable), e.g. "
                             "model.progressive_input=input_skip")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per train-step variant (default 5, quick 2)")
    parser.add_argument("--quick", action="store_true",
                        help="small batches, few steps and ODE tolerances of 1e-2")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the chip's peak TFLOP/s at the compute dtype, per device; adds "
                             "the column of_peak (achieved TFLOP/s / peak) to train rows")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for name, valid in (("models", MODELS), ("sections", SECTIONS)):
        bad = sorted(set(getattr(args, name)) - set(valid))
        if bad:
            parser.error(f"--{name}: unknown {bad}; choose from {valid}.")
    if not args.devices or min(args.devices) < 1:
        parser.error("--devices needs positive device counts, e.g. 1,8.")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(max(args.devices)))  # CPU only
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from benchmarks import suite  # Imports jax: after the device count is set.
    suite.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
