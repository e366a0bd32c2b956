"""Experiment 4 of docs/method.md: a one-layer untied autoencoder trained with the QC penalty alone.

Model (x in R^D, D = 2, hidden size H = 2):
  s(x) = R h(W^T x + b) + c,  R, W [D, H] untied, b [H], c [D], all initialised U[-1, 1]
  (the biases too, as in the authors' reference code); h(z) = z sigmoid(beta z) per unit
  with a learnable beta [H] initialised to 1 (models.toy.LearnableSwish).
Its Jacobian is J(x) = R diag(h'(W^T x + b)) W^T = sum_k h'_k(x) r_k w_k^T (r_k, w_k the
k-th columns of R and W). J(x) is symmetric at every x when each r_k w_k^T is symmetric,
i.e. r_k is parallel to w_k: R = W diag(alpha). Then W R^T - R W^T = 0 while
W - R = W (I - diag(alpha)) need not vanish, so a conservative field does not need tied
weights. That is the claim checked here.

Training: L_QC = mean over a 40 x 40 grid on [-10, 10]^2 of Asym(J(x)) = 1/2 ||J - J^T||_F^2
(exact 2 x 2 Jacobian), Adam (lr 1e-4) on gradients clipped to global norm 1, 10,002 steps
(the authors' loop: n_iters + 1 updates with n_iters = 10,001).
All seeds train at once (vmap) inside one lax.scan; L_QC, ||W R^T - R W^T||_F and
||W - R||_F are recorded at every step, on device.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax import lax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qcsbm_jax import asymmetry
from qcsbm_jax.models.toy import LearnableSwish

RECORDS = ("loss", "commutator", "difference")


class UntiedAutoencoder(nnx.Module):
    """s(x) = R h(W^T x + b) + c with untied R, W [dim, hidden]; x [B, dim] -> [B, dim]."""

    def __init__(self, dim: int = 2, hidden: int = 2, init_scale: float = 1.0, *,
                 rngs: nnx.Rngs):
        def uniform(*shape):
            return jax.random.uniform(rngs.params(), shape, minval=-init_scale,
                                      maxval=init_scale)

        self.W = nnx.Param(uniform(dim, hidden))
        self.R = nnx.Param(uniform(dim, hidden))
        self.b = nnx.Param(uniform(hidden))
        self.c = nnx.Param(uniform(dim))
        self.h = LearnableSwish(hidden)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.h(x @ self.W[...] + self.b[...]) @ self.R[...].T + self.c[...]


def init_params(keys: jax.Array, model_config: ml_collections.ConfigDict):
    """Parameters for each key [S]: (graphdef, pure dict with leaves [S, ...])."""
    def split(key):
        model = UntiedAutoencoder(model_config.dim, model_config.hidden, model_config.init_scale,
                                  rngs=nnx.Rngs(key))
        graphdef, state = nnx.split(model)
        return graphdef, nnx.to_pure_dict(state)

    splits = [split(key) for key in keys]
    return splits[0][0], jax.tree.map(lambda *leaves: jnp.stack(leaves), *[p for _, p in splits])


def grid(num: int, half_width: float) -> jax.Array:
    """The num x num grid of [-half_width, half_width]^2: [num^2, 2]."""
    axis = jnp.linspace(-half_width, half_width, num)
    return jnp.stack(jnp.meshgrid(axis, axis), -1).reshape(-1, 2)


def qc_loss(params: dict, graphdef, points: jax.Array) -> jax.Array:
    """L_QC: mean over points [M, D] of Asym of the exact Jacobian of s."""
    jacobian = asymmetry.full_jacobian(nnx.merge(graphdef, params), points)
    return jnp.mean(asymmetry.asymmetry(jacobian))


def weight_norms(params: dict) -> dict:
    """||W R^T - R W^T||_F ('commutator') and ||W - R||_F ('difference'), scalars."""
    w, r = params["W"], params["R"]
    return {"commutator": jnp.linalg.norm(w @ r.T - r @ w.T),
            "difference": jnp.linalg.norm(w - r)}


def column_alignment(params: dict) -> jax.Array:
    """|cos| of the angle between the k-th columns of W and R: [..., H] (1 = parallel)."""
    w, r = params["W"], params["R"]
    norms = jnp.linalg.norm(w, axis=-2) * jnp.linalg.norm(r, axis=-2)
    return jnp.abs(jnp.sum(w * r, -2)) / norms


def train(params: dict, graphdef, points: jax.Array, optimizer: optax.GradientTransformation,
          num_steps: int):
    """num_steps optimiser steps on L_QC in one lax.scan, for one parameter set.

    Returns (final params, records name -> [num_steps + 1]); record i is taken at the
    parameters after i steps.
    """
    def record(p, loss):
        return {"loss": loss, **weight_norms(p)}

    def step(carry, _):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(qc_loss)(p, graphdef, points)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), record(p, loss)

    (params, _), records = lax.scan(step, (params, optimizer.init(params)), None, num_steps)
    final = record(params, qc_loss(params, graphdef, points))
    return params, jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), records, final)


def run(config: ml_collections.ConfigDict):
    """Trains every seed. Returns (final params [S, ...], records name -> [S, T + 1] numpy)."""
    keys = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    graphdef, params = init_params(keys, config.model)
    optimizer = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                            optax.adam(config.optim.learning_rate))
    points = grid(config.grid.num, config.grid.half_width)
    train_all = jax.jit(jax.vmap(lambda p: train(p, graphdef, points, optimizer,
                                                 config.num_steps)))
    final, records = train_all(params)
    return jax.tree.map(np.asarray, final), jax.tree.map(np.asarray, records)


def summarise(records: dict, log_every: int) -> dict:
    """JSON-ready results: per-seed curves every log_every steps, and the final values."""
    steps = np.arange(records["loss"].shape[1])[::log_every].tolist()
    if steps[-1] != records["loss"].shape[1] - 1:
        steps.append(records["loss"].shape[1] - 1)
    return {"steps": steps,
            "curves": {name: values[:, steps].tolist() for name, values in records.items()},
            "initial": {name: values[:, 0].tolist() for name, values in records.items()},
            "final": {name: values[:, -1].tolist() for name, values in records.items()},
            "final_mean": {name: float(values[:, -1].mean()) for name, values in records.items()},
            "final_std": {name: float(values[:, -1].std()) for name, values in records.items()},
            "min_difference": records["difference"].min(axis=1).tolist()}


def plot_curves(path: str, records: dict) -> str:
    """Both norms against the step, one line per seed: commutator (log y), difference."""
    fig = Figure(figsize=(11, 4), dpi=100)
    labels = {"commutator": "||W R^T - R W^T||_F", "difference": "||W - R||_F"}
    for ax, name in zip(fig.subplots(1, 2), labels):
        for seed, values in enumerate(records[name]):
            ax.plot(np.arange(values.size), values, linewidth=1, label=f"seed {seed}")
        ax.set(xlabel="training step", title=labels[name],
               yscale="log" if name == "commutator" else "linear")
        ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig).print_png(path)
    return path


def write_outputs(workdir: str, config, final: dict, records: dict, wall_time: float):
    """Writes results.json and curves.png; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    results = {**summarise(records, config.log_every), "wall_time_s": wall_time,
               "final_params": jax.tree.map(lambda a: a.tolist(), final),
               "final_column_alignment": np.asarray(column_alignment(final)).tolist(),
               "config": config.to_dict()}
    path = os.path.join(workdir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return [path, plot_curves(os.path.join(workdir, "curves.png"), records)]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    start = time.perf_counter()
    final, records = run(config)
    wall_time = time.perf_counter() - start
    for path in write_outputs(flags.FLAGS.workdir, config, final, records, wall_time):
        logging.info("Wrote %s", path)
    for name, values in records.items():
        logging.info("%s: initial %s, final %s", name, values[:, 0], values[:, -1])
    logging.info("Wall time %.1f s", wall_time)


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/autoencoder.py[:smoke]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
