"""One core's rate on the 3 x 3 convolutions of the paper's NCSN++, in XLA and in torch.

    taskset -c 0 .venv/bin/python -m benchmarks.conv_kernels --json xla.json
    taskset -c 0 /path/to/torch/python -m benchmarks.conv_kernels --library torch \
        --json torch.json

For each shape [batch, size, size, channels] (channels -> channels, 'same' padding), the
three convolutions a train step runs: the forward pass, the gradient with respect to the
input and the gradient with respect to the kernel; GFLOP/s = 2 x multiply-adds over the
fastest of --repeats calls. One thread (XLA without its multi-threaded Eigen, which its
convolutions ignore: pin the process with taskset; torch.set_num_threads(1)). It tells
how much of a train step's gap between the two libraries on a CPU is their convolution
kernels (docs/benchmarks.md, "Against the authors' code"). The torch side needs torch and
nothing else from this repository.
"""

import argparse
import json
import os
import platform
import time

# The deep NCSN++'s levels at batch 4 (32 x 32 x 128, then 256 channels below).
SHAPES = ((4, 32, 128), (4, 16, 256), (4, 8, 256))
KINDS = ("forward", "input_grad", "kernel_grad")


def one_thread_xla_flags(environ) -> str:
    """XLA_FLAGS of `environ` plus those that keep XLA on one thread (its matrix
    products; its convolutions ignore them: pin the process too)."""
    return (environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
            "intra_op_parallelism_threads=1").strip()


def _fastest(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def xla_calls(batch: int, size: int, channels: int) -> dict:
    """kind -> a call of the jitted XLA convolution (NHWC, HWIO) that waits for it."""
    import jax
    import jax.numpy as jnp
    x, w = jnp.ones((batch, size, size, channels)), jnp.ones((3, 3, channels, channels))
    g = jnp.ones((batch, size, size, channels))
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    programs = {
        "forward": (jax.jit(conv), (x, w)),
        "input_grad": (jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
                       (x, w, g)),
        "kernel_grad": (jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]),
                        (x, w, g)),
    }
    return {kind: (lambda f=f, a=a: jax.block_until_ready(f(*a)))
            for kind, (f, a) in programs.items()}


def torch_calls(batch: int, size: int, channels: int) -> dict:
    """kind -> a call of torch's convolution (NCHW) or its gradient."""
    import torch
    x, w = torch.ones(batch, channels, size, size), torch.ones(channels, channels, 3, 3)
    g = torch.ones(batch, channels, size, size)
    return {
        "forward": lambda: torch.nn.functional.conv2d(x, w, padding=1),
        "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1),
        "kernel_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1),
    }


def rate(library: str, batch: int, size: int, channels: int, kind: str = "forward",
         repeats: int = 20) -> float:
    """GFLOP/s of one convolution kind of [batch, size, size, channels], channels ->
    channels, 3 x 3, in 'xla' or 'torch' (as many threads as the caller allows): 2
    operations per multiply-add over the fastest of `repeats` calls."""
    calls = (torch_calls if library == "torch" else xla_calls)(batch, size, channels)
    flop = 2.0 * batch * size * size * channels * channels * 9
    return flop / _fastest(calls[kind], repeats) / 1e9


def measure(library: str, repeats: int) -> list[dict]:
    """One row per shape of SHAPES: its rate for every kind, one thread."""
    if library == "torch":
        import torch
        torch.set_num_threads(1)
    return [dict(shape=[batch, size, size, channels],
                 **{kind: rate(library, batch, size, channels, kind, repeats)
                    for kind in KINDS})
            for batch, size, channels in SHAPES]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv_kernels",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--library", choices=("xla", "torch"), default="xla")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.library == "xla":
        os.environ["XLA_FLAGS"] = one_thread_xla_flags(os.environ)
    rows = measure(args.library, args.repeats)
    print(f"| {args.library} GFLOP/s, one core | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for row in rows:
        print(f"| {' x '.join(map(str, row['shape']))} | "
              + " | ".join(f"{row[kind]:.1f}" for kind in KINDS) + " |")
    if args.json:
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        with open(args.json, "w") as f:
            json.dump(dict(library=args.library, repeats=args.repeats, cores=affinity,
                           python=platform.python_version(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
