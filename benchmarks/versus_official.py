"""qcsbm_jax's train steps against the paper's official PyTorch code, on one machine.

    /path/to/torch/python -m benchmarks.versus_official --network small --batch 16 \
        --rounds 5 --threads 1 --official /path/to/qcsbm/real_world \
        --jax_python .venv/bin/python --json benchmarks/results/versus_official_small.json

Run from the repository root with a Python that has torch (the official side runs in this
process; it needs torch, numpy, scipy and ml_collections) and point --official at
real_world/ of a checkout of chen-hao-chao/qcsbm. Our side runs in a worker subprocess
(--jax_python, a Python with qcsbm_jax's dependencies). Not part of the test suite: it
needs torch and the official code.

Same network, batch and data on both sides: NCSN++ with our `image_config("cifar10",
"usbm", "small")` settings (--network small: nf 16, channel multipliers (1, 2, 2), one
residual block per resolution, attention at 8 x 8, no dropout) or the paper's deep one
(--network deep: nf 128, (1, 2, 2, 2), 8 blocks, attention at 16 x 16, dropout 0.1), with
residual progressive input on both sides; the parameter counts are checked to agree.
Both steps are whole train steps: loss, gradient, clipping, Adam, EMA, on a fixed batch
of uniform-noise images, VE SDE, sigma^2 weighting, one Rademacher probe per sample,
penalty weight 1e-4. The official QC step is their double-backward form (our
estimator 'two_vjp' with the paper's gradient). The official `op` package compiles a CUDA
extension when imported; this script replaces the compiler call by a stub before the
import, so the official code takes its own CPU path (upfirdn2d_native).

Rounds are interleaved: each round runs every step of both sides in turn, so a change of
load on a shared machine hits all of them alike; ratios are taken within each round and
reported as median and range over rounds.

What limits each side: the floating-point operations of one step (ours: XLA's count of
the compiled program, every operation; theirs: torch's flop formulas, which count
convolutions and matrix products only), the rate a step reaches (GFLOP/s at its median
time), and that rate as a share of the same library's rate on a plain 3 x 3 convolution
of the network's first level (batch x 32 x 32 x nf, nf -> nf channels; the fastest of
100 calls) on this machine.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from benchmarks import conv_kernels, official_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_DEFAULT = "../qcsbm/real_world"
QC_WEIGHT = 1e-4
# Our variants: losses.make_loss_fn options (None: DSM), and what each is.
OURS = {
    "dsm": (None, "DSM"),
    "qc_two_vjp": (dict(estimator="two_vjp"), "QC, the paper's estimator and gradient"),
    "qc_nonneg": (dict(estimator="nonneg"), "QC, our default estimator, the paper's gradient"),
    "qc_jvp": (dict(estimator="nonneg", qc_gradient="jvp"), "QC, qc_gradient='jvp'"),
    "qc_jvp_frac25": (dict(estimator="nonneg", qc_gradient="jvp", qc_fraction=0.25),
                      "QC, qc_gradient='jvp', qc_fraction 0.25"),
}
NETWORKS = {
    "small": dict(variant="small", steps_per_round=2),
    "deep": dict(variant=None, steps_per_round=1),
}


# ---------------------------------------------------------------------------- ours (JAX)

def _our_config(network: str):
    from qcsbm_jax import config as config_lib
    return config_lib.image_config("cifar10", "usbm", NETWORKS[network]["variant"])


def worker(args: argparse.Namespace) -> None:
    """Our side, in its own process: compiles each variant's train step, then answers
    'run NAME STEPS' on stdin with the seconds STEPS steps took (one JSON line each)."""
    import jax
    import numpy as np

    from benchmarks import common
    from qcsbm_jax import experiment, losses, train

    cfg = _our_config(args.network)
    model = experiment.build_score_model(cfg)
    optimizer = train.make_optimizer(cfg.optim)
    state = jax.jit(lambda p: train.init_state(p, optimizer, 0))(model.init_params)
    data = jax.random.uniform(jax.random.key(0), (args.batch, *model.data_shape))
    steps, info = {}, {}
    for name in args.ours:
        options = OURS[name][0]
        penalty = {} if options is None else dict(qc_weight=QC_WEIGHT, **options)
        loss_fn = losses.make_loss_fn(model.score_fn, model.sde,
                                      **dict(cfg.loss.to_dict(), **penalty))
        program = jax.jit(train.make_train_step(loss_fn, optimizer, cfg.optim.ema_decay),
                          donate_argnums=0)
        start = time.perf_counter()
        compiled = program.lower(state, data).compile()
        info[name] = dict(compile_s=time.perf_counter() - start, gflop=common.gflops(compiled))
        state, _ = jax.block_until_ready(compiled(state, data))  # Warm-up.
        steps[name] = compiled
    num_params = sum(int(np.size(a)) for a in jax.tree.leaves(model.init_params))
    _reply(dict(ready=True, num_params=num_params, info=info, jax=jax.__version__,
                conv_gflop_per_s=conv_kernels.rate("xla", args.batch, 32, cfg.model.nf,
                                                   repeats=100)))
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            return
        name, count = command[1], int(command[2])
        start = time.perf_counter()
        for _ in range(count):
            state, metrics = steps[name](state, data)
        jax.block_until_ready((state, metrics))
        _reply(dict(seconds=time.perf_counter() - start))


def _reply(message: dict) -> None:
    print(json.dumps(message), flush=True)


class OurSide:
    """The worker subprocess seen from the driver."""

    def __init__(self, args: argparse.Namespace):
        command = [args.jax_python, "-m", "benchmarks.versus_official", "--worker",
                   "--network", args.network, "--batch", str(args.batch),
                   "--ours", ",".join(args.ours)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
        if args.threads == 1:
            env["XLA_FLAGS"] = conv_kernels.one_thread_xla_flags(env)
        self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"The JAX worker ended (exit {self.process.wait()}); its "
                               "error is above.")
        return json.loads(line)

    def run(self, name: str, count: int) -> float:
        self.process.stdin.write(f"run {name} {count}\n")
        self.process.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait()


# ---------------------------------------------------------------------------- driver

def _our_model_dict(args: argparse.Namespace) -> dict:
    """Our config.model, read by the worker's Python (the driver has no jax)."""
    script = ("import json; from benchmarks.versus_official import _our_config; "
              f"print(json.dumps(_our_config({args.network!r}).model.to_dict()))")
    done = subprocess.run([args.jax_python, "-c", script], cwd=REPO, capture_output=True,
                          text=True, check=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu"))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(times: dict, steps: int, gflop: dict, conv_rate: dict) -> dict:
    """Per-step medians, within-round ratios (median, min, max over rounds) and rates.

    gflop: 'side/name' -> GFLOP of one step; conv_rate: side -> reference GFLOP/s.
    """
    per_step = {k: [t / steps for t in v] for k, v in times.items()}

    def ratio(a, b):
        values = [x / y for x, y in zip(per_step[a], per_step[b])]
        return dict(median=statistics.median(values), min=min(values), max=max(values))

    ours = [k for k in per_step if k.startswith("ours/")]
    ratios = {f"{k} / theirs/{'dsm' if k == 'ours/dsm' else 'qc'}":
              ratio(k, "theirs/dsm" if k == "ours/dsm" else "theirs/qc") for k in ours}
    ratios.update({f"{k} / ours/dsm": ratio(k, "ours/dsm") for k in ours if k != "ours/dsm"})
    ratios["theirs/qc / theirs/dsm"] = ratio("theirs/qc", "theirs/dsm")
    step_s = {k: statistics.median(v) for k, v in per_step.items()}
    rates = {k: gflop[k] / s for k, s in step_s.items() if gflop.get(k)}
    return dict(step_s=step_s, per_round_step_s=per_step, ratios=ratios, gflop=gflop,
                gflop_per_s=rates, conv_gflop_per_s=conv_rate)


def format_table(summary: dict) -> str:
    step_s, ratios = summary["step_s"], summary["ratios"]
    span = lambda r: f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    def work(key: str) -> str:
        """'GFLOP | GFLOP/s (share of the side's convolution rate)' of one step."""
        rate = summary["gflop_per_s"].get(key)
        if rate is None:
            return " | "
        share = rate / summary["conv_gflop_per_s"][key.split("/")[0]]
        return f"{summary['gflop'][key]:.1f} | {rate:.1f} ({share:.0%})"

    lines = ["| step | what | step s | GFLOP | GFLOP/s (of conv rate) | ours / theirs "
             "| QC / DSM |", "|---|---|---|---|---|---|---|"]
    for name, what in official_steps.THEIRS.items():
        key = f"theirs/{name}"
        lines.append(f"| official {name} | {what} | {step_s[key]:.3f} | {work(key)} | | "
                     f"{span(ratios[key + ' / theirs/dsm']) if name == 'qc' else ''} |")
    for key in (k for k in step_s if k.startswith("ours/")):
        name = key.split("/")[1]
        against = [r for k, r in ratios.items() if k.startswith(key + " / theirs")][0]
        to_dsm = ratios.get(key + " / ours/dsm")
        lines.append(f"| qcsbm_jax {name} | {OURS[name][1]} | {step_s[key]:.3f} | "
                     f"{work(key)} | {span(against)} | {span(to_dsm) if to_dsm else ''} |")
    conv = summary["conv_gflop_per_s"]
    lines.append(f"\nReference 3 x 3 convolution: torch {conv['theirs']:.1f} GFLOP/s, "
                 f"XLA {conv['ours']:.1f} GFLOP/s.")
    return "\n".join(lines)


def _machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(cpu=cpu, cpu_count=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), python=platform.python_version())


def _pin_to_one_core() -> int:
    """Restricts this process, and the worker it starts, to one core; returns it. XLA's
    CPU convolutions use every core they may, whatever its thread flags say."""
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("--threads 1 pins both sides to one core, which needs "
                         "os.sched_setaffinity (Linux); run with --threads 0 elsewhere.")
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def main(args: argparse.Namespace) -> dict:
    core = _pin_to_one_core() if args.threads == 1 else None
    start_load = os.getloadavg()
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}: NCSN++ {args.network}, "
          f"batch {args.batch}; load average {start_load}", flush=True)
    our_model = _our_model_dict(args)
    theirs = official_steps.TheirSide(args, our_model, QC_WEIGHT)
    print(f"  official side ready: {theirs.num_params} parameters", flush=True)
    ours = OurSide(args)
    print(f"  qcsbm_jax side ready: {ours.ready['num_params']} parameters; compile s "
          f"{ {k: round(v['compile_s'], 1) for k, v in ours.ready['info'].items()} }",
          flush=True)
    if ours.ready["num_params"] != theirs.num_params:
        ours.close()
        raise SystemExit(f"Not the same network: {ours.ready['num_params']} parameters "
                         f"against the official {theirs.num_params}.")
    steps = NETWORKS[args.network]["steps_per_round"]
    times = ({f"theirs/{k}": [] for k in official_steps.THEIRS}
             | {f"ours/{k}": [] for k in args.ours})
    loads = []
    for round_index in range(args.rounds):
        for key in times:
            side, name = key.split("/")
            times[key].append(theirs.run(name, steps) if side == "theirs"
                              else ours.run(name, steps))
        loads.append(os.getloadavg()[0])
        print(f"  round {round_index + 1}/{args.rounds}: "
              f"{ {k: round(v[-1] / steps, 3) for k, v in times.items()} }", flush=True)
    ours.close()
    gflop = ({f"theirs/{k}": v for k, v in theirs.gflop.items()}
             | {f"ours/{k}": v["gflop"] for k, v in ours.ready["info"].items()})
    summary = _summary(times, steps, gflop, dict(theirs=theirs.conv_gflop_per_s,
                                                 ours=ours.ready["conv_gflop_per_s"]))
    result = dict(args=vars(args), machine=dict(_machine(), jax=ours.ready["jax"],
                                                load_average_start=start_load,
                                                load_average_rounds=loads,
                                                load_average_end=os.getloadavg(),
                                                pinned_core=core),
                  num_params=theirs.num_params, steps_per_round=steps,
                  our_compile_s={k: v["compile_s"] for k, v in ours.ready["info"].items()},
                  **summary)
    print("\n" + format_table(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus_official",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ours", type=lambda s: [v for v in s.split(",") if v],
                        default=list(OURS), help=f"our variants, from {list(OURS)}")
    parser.add_argument("--official", default=OFFICIAL_DEFAULT,
                        help="real_world/ of a checkout of chen-hao-chao/qcsbm")
    parser.add_argument("--jax_python", default=os.path.join(REPO, ".venv/bin/python"),
                        help="a Python with qcsbm_jax's dependencies, for our side")
    parser.add_argument("--threads", type=int, default=0, choices=(0, 1),
                        help="1: both sides pinned to one core (Linux), one thread each "
                             "(torch.set_num_threads(1); XLA without its multi-threaded "
                             "Eigen), which a loaded machine disturbs least; 0: each "
                             "library's default (all cores)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.ours) - set(OURS))
    if unknown:
        parser.error(f"--ours: unknown {unknown}; choose from {list(OURS)}.")
    if "dsm" not in args.ours:
        args.ours = ["dsm"] + args.ours
    return args


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    worker(arguments) if arguments.worker else main(arguments)
