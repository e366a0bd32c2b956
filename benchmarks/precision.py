"""bfloat16 against float32 for the values and parameter gradients of the DSM loss and the
QC penalty, next to their sampling noise (training.compute_dtype, models.mixed_precision).

    python -m benchmarks.precision --models toy,ncsnpp_small --draws 8 \
        --json benchmarks/results/cpu_bf16_precision.json

Both precisions run the score function models.functional builds from one network (float32
master parameters) on the same draws of t, z and probes, so their difference is rounding
alone; the sampling noise is how much the float32 value or gradient itself changes from
one draw to the next at this batch size, the noise SGD already lives with. Rounding is
harmless when it is well below that (error_over_noise << 1). The penalty is the 'nonneg'
Hutchinson estimate weighted by std^2 as in the loss; its gradient is taken both ways of
loss.qc_gradient ('estimate', the paper's; 'jvp'). Image networks are built with
model.init_scale = 1: with the paper's init_scale 0 a fresh network's output is about
1e-10 and the DSM loss would not depend on the network. Data: toy samples, or
uniform-noise images. Standalone (not part of benchmarks.run); not run in CI.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from qcsbm_jax import asymmetry, config as config_lib, losses, models, score, sde as sde_lib
from qcsbm_jax.data import toy
from qcsbm_jax.sde import bcast

QUANTITIES = ("dsm", "dsm_grad", "qc", "qc_grad_estimate", "qc_grad_jvp")
# name: (config, batch).
MODELS = {
    "toy": (lambda: config_lib.toy_config("checkerboard", "usbm"), 5000),
    "ncsnpp_small": (lambda: config_lib.image_config("cifar10", "usbm", "small"), 16),
}


def _relative(a: jax.Array, b: jax.Array) -> float:
    """||a - b|| / ||b||."""
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _sample_noise(draws: jax.Array) -> float:
    """Standard deviation over draws (axis 0) over the norm of their mean."""
    mean = jnp.mean(draws, axis=0)
    spread = jnp.sum(jnp.square(draws - mean)) / (draws.shape[0] - 1)
    return float(jnp.sqrt(spread) / jnp.linalg.norm(mean))


def _programs(score_fn, sde, x0: jax.Array, eps: float) -> dict:
    """QUANTITIES as jitted functions of (params, key): key draws t, z and the probes."""
    def inputs(key):
        kt, kz, kv = jax.random.split(key, 3)
        t = jax.random.uniform(kt, (x0.shape[0],), minval=eps, maxval=1.0)
        z = jax.random.normal(kz, x0.shape)
        mean, std = sde.marginal_mean_std(x0, t)
        return mean + bcast(std, mean) * z, t, z, std, kv

    def dsm(params, key):
        x, t, z, std, _ = inputs(key)
        return jnp.mean(losses.dsm_per_sample(score_fn(params, x, t, None), z, std,
                                              jnp.square(std)))

    def penalty(params, key, gradient):
        x, t, _, std, probe_key = inputs(key)
        field = lambda y, times: score_fn(params, y, times, None)
        _, per_sample = asymmetry.asymmetry_penalty(field, x, t, probe_key, gradient=gradient)
        return jnp.mean(jnp.square(std) * per_sample)

    grad = lambda f: jax.jit(lambda p, k: common.flat_leaves(jax.grad(f)(p, k)))
    return dict(dsm=jax.jit(dsm), dsm_grad=grad(dsm),
                qc=jax.jit(lambda p, k: penalty(p, k, "estimate")),
                qc_grad_estimate=grad(lambda p, k: penalty(p, k, "estimate")),
                qc_grad_jvp=grad(lambda p, k: penalty(p, k, "jvp")))


def _data(cfg, shape: tuple[int, ...], batch: int) -> jax.Array:
    key = jax.random.key(0)
    if shape == (2,):
        return toy.sample_toy(cfg.data.name, key, batch)
    return jax.random.uniform(key, (batch, *shape))


def precision_rows(name: str, num_draws: int, dtype: str = "bfloat16") -> list[dict]:
    """One row per QUANTITIES entry over num_draws draws of t, z and probes: low_vs_f32,
    the median relative error of the low-precision value or gradient; sample_noise, the
    float32 spread over draws (_sample_noise); error_over_noise, their ratio."""
    make_config, batch = MODELS[name]
    cfg = make_config().copy_and_resolve_references()
    if "init_scale" in cfg.model:
        cfg.model.init_scale = 1.0
    shape = (2,) if cfg.model.name == "toy_mlp" else (32, 32, 3)
    network = models.build_model(cfg.model, shape, jax.random.key(cfg.seed))
    sde = sde_lib.get_sde(**cfg.sde)
    x0 = _data(cfg, shape, batch)

    def programs(compute_dtype):
        apply_fn, _ = models.functional(network, compute_dtype)
        score_fn = score.make_score_fn(apply_fn, sde, cfg.model.family, cfg.model.output)
        return _programs(score_fn, sde, x0, cfg.loss.eps)

    params = models.functional(network)[1]
    keys = jax.random.split(jax.random.key(8), num_draws)
    high, low = programs("float32"), programs(dtype)
    rows = []
    for quantity in QUANTITIES:
        pairs = [(low[quantity](params, k), high[quantity](params, k)) for k in keys]
        error = float(np.median([_relative(a, b) for a, b in pairs]))
        noise = _sample_noise(jnp.stack([b for _, b in pairs]))
        rows.append(dict(model=name, batch=batch, dtype=dtype, quantity=quantity,
                         draws=num_draws, low_vs_f32=error, sample_noise=noise,
                         error_over_noise=error / noise))
        print(f"  {name} {quantity}: bf16 vs f32 {error:.2e}, sample noise {noise:.2e}, "
              f"ratio {error / noise:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="toy,ncsnpp_small",
                        help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or args.draws < 2:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}; "
                     "--draws must be >= 2.")
    info = common.machine()
    common.print_machine(info)
    rows = [row for name in names for row in precision_rows(name, args.draws)]
    print(common.markdown_table(rows, ("model", "batch", "quantity", "low_vs_f32",
                                       "sample_noise", "error_over_noise")))
    common.write_json(args.json, dict(machine=info, rows=rows))


if __name__ == "__main__":
    main()
