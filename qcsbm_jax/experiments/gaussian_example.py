"""Experiment 1 of docs/method.md: sampling a Gaussian with a perturbed score by gradient steps.

What is implemented (2D, x = (x1, x2), r = |x|, theta the polar angle):

  p(x)   = N(x; 0, sigma^2 I), sigma = 0.1, exact score -x / sigma^2;
  mu(x)  = (1/K) sum_k N(x; m_k, I), m_k = 3 (cos 2 pi k / K, sin 2 pi k / K), K = 10;
  s(x)   = -x / sigma^2 + u(x),   u(x) = c(x) d(x),
  c(x)^2 = 2 eps mu(x) / (p(x) (r^2 + eps) + delta),
  d(x)   = (-x2, x1) for the 'rotational' field, (x1, x2) for the 'radial' one.

* d is not normalised (|d| = r), which is what makes the score error about eps:
  1/2 E_p |u|^2 = eps E_mu[r^2 p / (p (r^2 + eps) + delta)], for delta = 0 equal to
  eps E_mu[r^2 / (r^2 + eps)] = eps (1 - O(eps)). With the unit direction d / r it would be
  eps E_mu[1 / (r^2 + eps)], about 0.18 eps.
* delta is a floor under the denominator; the default 1e-8 is the value of the authors'
  reference code. (That code also adds 1e-6 to eps inside c(x)^2 for every eps > 0: the
  eps_offset of the config, 1e-6 by default, 0 for the formula as written.)
  With delta = 0 the formula is exact but c grows like
  exp(r^2 / (4 sigma^2)) (c ~ e^193 at (-2, -2) for eps = 1e-3), and gradient steps from
  N(-2, 0.5^2 I) diverge for every eps > 0 with either direction. With delta = 1e-8, u is
  capped where p is below ~1e-8 (r > ~0.6), sampling works, and the score error is only about
  0.003 eps: mu puts little mass where p is not tiny. Densities are handled as logs throughout.
* In 2D, Asym = 1/2 ||J - J^T||_F^2 = (curl s)^2, curl s = ds2/dx1 - ds1/dx2, and the exact
  score is curl-free. Rotational: curl u = 2 c + x . grad c > 0 wherever c > 0. Radial:
  curl u = -dc/dtheta, not exactly zero because mu has a 10-fold, not a full, rotational
  symmetry: its relative angular variation 2 I_10(3 r) / I_0(3 r) is 3e-15 at r = 0.1 (where
  p lives) and 1e-2 at r = 3 (where mu lives). The radial field is conservative to rounding
  error under p and nearly, not exactly, conservative under mu.

Metrics, by deterministic polar quadrature (`polar_quadrature`): the score error
1/2 E_p |u|^2, and Asym and NAsym of s (exact 2 x 2 Jacobian per point) averaged under p --
the data distribution, where a learned score is trained and judged, and the weighting of
the reference code -- and under mu, where the perturbation lives.

Sampling: x_{i+1} = x_i + a_i s(x_i), a_i = a0 exp(-i / 1000), a0 = 0.0125 (0.01 when
eps = 0: with sigma^2 = 0.01 the first step then lands on the origin), 300 steps, 10
particles from N((-2, -2), 0.5^2 I), one particle set per seed. The step count is the first
i (0 <= i <= 300; i steps taken) at which the particles' mean of a reading is below 1e-3:
  'clipped':  max(-log p(x), 0), as in the reference code; zero for
              r < sigma sqrt(2 log(1 / (2 pi sigma^2))) = 0.235;
  'relative': -log p(x) + log p(0) = r^2 / (2 sigma^2) >= 0, stricter (r below ~0.0045).
"""

import functools
import json
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax import lax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qcsbm_jax import asymmetry

FIELDS = ("rotational", "radial")
READINGS = ("clipped", "relative")


class Problem(NamedTuple):
    """Target std sigma (scalar), mixture means [K, 2] of mu, denominator floor delta, and
    the offset added to every eps > 0 inside c(x)^2."""
    sigma: jax.Array
    means: jax.Array
    floor: jax.Array
    eps_offset: jax.Array


def make_problem(config: ml_collections.ConfigDict, dtype) -> Problem:
    """The Problem of a config: K = config.mixture.num_modes means on a circle."""
    angles = 2 * np.pi * np.arange(config.mixture.num_modes) / config.mixture.num_modes
    means = config.mixture.radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return Problem(*(jnp.asarray(v, dtype) for v in (config.sigma, means, config.floor,
                                                     config.eps_offset)))


def log_target(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """log p(x) for x [..., 2]; returns [...]."""
    return -jnp.sum(jnp.square(x), -1) / (2 * sigma**2) - jnp.log(2 * jnp.pi * sigma**2)


def log_mixture(x: jax.Array, means: jax.Array) -> jax.Array:
    """log mu(x) for x [..., 2] and unit-variance components at means [K, 2]; returns [...]."""
    squared = jnp.sum(jnp.square(x[..., None, :] - means), -1)
    return jax.nn.logsumexp(-squared / 2, -1) - jnp.log(2 * jnp.pi * means.shape[0])


def log_coefficient_sq(x: jax.Array, eps: jax.Array, problem: Problem) -> jax.Array:
    """log c(x)^2 = log(2 e mu) - log(p (r^2 + e) + delta), e = eps + eps_offset, for x
    [..., 2]; -inf if eps = 0."""
    positive = eps > 0
    eps = jnp.where(positive, eps + problem.eps_offset, 1.0)
    denominator = jnp.logaddexp(log_target(x, problem.sigma) + jnp.log(jnp.sum(x**2, -1) + eps),
                                jnp.log(problem.floor))
    value = jnp.log(2 * eps) + log_mixture(x, problem.means) - denominator
    return jnp.where(positive, value, -jnp.inf)


def score(x: jax.Array, eps: jax.Array, problem: Problem, field: str) -> jax.Array:
    """s(x) = -x / sigma^2 + c(x) d(x) for x [..., 2]; returns [..., 2]."""
    if field not in FIELDS:
        raise ValueError(f"field must be one of {FIELDS}, got {field!r}.")
    direction = jnp.stack([-x[..., 1], x[..., 0]], -1) if field == "rotational" else x
    coefficient = jnp.exp(0.5 * log_coefficient_sq(x, eps, problem))
    return -x / problem.sigma**2 + coefficient[..., None] * direction


def polar_quadrature(radial_edges, nodes_per_panel: int, num_angles: int):
    """Nodes [M, 2] and area weights [M] (numpy float64) on the disc r < radial_edges[-1].

    Gauss-Legendre in r on each panel [edges[i], edges[i + 1]] times the midpoint rule in
    theta (spectrally accurate for periodic integrands); M = panels * nodes * angles and
    sum(weights) = pi edges[-1]^2.
    """
    nodes, node_weights = np.polynomial.legendre.leggauss(nodes_per_panel)
    edges = np.asarray(radial_edges, np.float64)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    radii = (half * (nodes + 1) + edges[:-1, None]).ravel()
    radial_weights = (half * node_weights).ravel() * radii
    theta = 2 * np.pi * (np.arange(num_angles) + 0.5) / num_angles
    points = np.stack([np.outer(radii, np.cos(theta)), np.outer(radii, np.sin(theta))], -1)
    weights = np.repeat(radial_weights, num_angles) * (2 * np.pi / num_angles)
    return points.reshape(-1, 2), weights


def density_weights(points: jax.Array, log_area: jax.Array, problem: Problem):
    """Quadrature weights of p and mu at points [M, 2] with log area weights [M].

    Returns (name -> normalised log weights [M], name -> quadrature mass (~1) of the density).
    """
    log_mass = {"p": log_target(points, problem.sigma) + log_area,
                "mu": log_mixture(points, problem.means) + log_area}
    return ({name: jax.nn.log_softmax(v) for name, v in log_mass.items()},
            {name: jnp.exp(jax.nn.logsumexp(v)) for name, v in log_mass.items()})


def score_error(eps: jax.Array, points: jax.Array, log_p: jax.Array,
                problem: Problem) -> jax.Array:
    """1/2 E_p |u|^2 with normalised log weights log_p [M] of p (the same for both fields)."""
    log_u_sq = log_coefficient_sq(points, eps, problem) + jnp.log(jnp.sum(points**2, -1))
    return 0.5 * jnp.exp(jax.nn.logsumexp(log_p + log_u_sq))


def field_metrics(eps: jax.Array, points: jax.Array, log_weights: dict, problem: Problem,
                  field: str) -> dict:
    """Asym and NAsym of s per point of points [M, 2], averaged with log_weights name -> [M].

    Returns {'asym_<name>': scalar, 'nasym_<name>': scalar} for every name in weights.
    """
    jacobian = asymmetry.full_jacobian(lambda y: score(y, eps, problem, field), points)
    asym, nasym = asymmetry.asymmetry(jacobian), asymmetry.normalized_asymmetry(jacobian)
    return {f"{metric}_{name}": jnp.sum(jnp.exp(w) * values) for name, w in log_weights.items()
            for metric, values in (("asym", asym), ("nasym", nasym))}


def step_sizes(eps: jax.Array, num_steps: int, step_size: float, step_size_exact: float,
               decay: float) -> jax.Array:
    """a_i = a0 exp(-i / decay), i < num_steps, a0 = step_size (step_size_exact if eps = 0)."""
    a0 = jnp.where(eps > 0, step_size, step_size_exact)
    return a0 * jnp.exp(-jnp.arange(num_steps, dtype=a0.dtype) / decay)


def gradient_steps(score_fn, init: jax.Array, sizes: jax.Array) -> jax.Array:
    """x <- x + a_i score_fn(x) for a_i in sizes [T]: init [N, 2] -> trajectory [T + 1, N, 2]."""
    def step(x, a):
        x = x + a * score_fn(x)
        return x, x

    _, xs = lax.scan(step, init, sizes)
    return jnp.concatenate([init[None], xs])


def nll_readings(trajectory: jax.Array, sigma: jax.Array) -> dict:
    """Particle means of both readings (module docstring): [..., N, 2] -> name -> [...].

    A particle that has overflowed (non-finite -log p) counts as +inf.
    """
    nll = -log_target(trajectory, sigma)
    nll = jnp.where(jnp.isfinite(nll), nll, jnp.inf)
    return {"clipped": jnp.mean(jnp.maximum(nll, 0.0), -1),
            "relative": jnp.mean(nll + log_target(jnp.zeros(2, nll.dtype), sigma), -1)}


def first_step_below(curve: jax.Array, threshold: float) -> jax.Array:
    """First index i of curve [T + 1] with curve[i] < threshold, or -1 if there is none."""
    below = curve < threshold
    return jnp.where(jnp.any(below), jnp.argmax(below), -1)


@functools.partial(jax.jit, static_argnames=("field", "num_steps"))
def simulate(epsilons: jax.Array, inits: jax.Array, problem: Problem, field: str, num_steps: int,
             step_size: float, step_size_exact: float, decay: float, threshold: float):
    """Particle runs for every eps [E] and seed, inits [S, N, 2].

    Returns trajectories [E, S, T + 1, N, 2], readings name -> [E, S, T + 1] and the step
    counts name -> [E, S] (first_step_below of each reading).
    """
    def run_one(eps, init):
        sizes = step_sizes(eps, num_steps, step_size, step_size_exact, decay)
        trajectory = gradient_steps(lambda x: score(x, eps, problem, field), init, sizes)
        readings = nll_readings(trajectory, problem.sigma)
        steps = {name: first_step_below(curve, threshold) for name, curve in readings.items()}
        return trajectory, readings, steps

    return jax.vmap(jax.vmap(run_one, in_axes=(None, 0)), in_axes=(0, None))(epsilons, inits)


@functools.partial(jax.jit, static_argnames=("num_seeds", "num_particles", "dtype"))
def _standard_normal_sets(seed: int, num_seeds: int, num_particles: int, dtype) -> jax.Array:
    """[num_seeds, num_particles, 2] standard normals, set i from fold_in(key(seed), i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(num_seeds))
    return jax.vmap(lambda k: jax.random.normal(k, (num_particles, 2), dtype))(keys)


def initial_particles(config: ml_collections.ConfigDict, dtype) -> jax.Array:
    """One particle set per seed, N(init_mean, init_std^2 I): [num_seeds, N, 2]."""
    s = config.sampling
    noise = _standard_normal_sets(config.seed, config.num_seeds, s.num_particles, dtype)
    return s.init_mean + s.init_std * noise


def run(config: ml_collections.ConfigDict):
    """Runs the experiment. Returns (results: JSON-ready dict, arrays for plots)."""
    if not set(config.plot.epsilons) <= set(config.epsilons):
        raise ValueError(f"plot.epsilons={config.plot.epsilons} must all be in "
                         f"epsilons={config.epsilons}.")
    s, q = config.sampling, config.quadrature
    with jax.enable_x64(config.float64):
        dtype = jnp.float64 if config.float64 else jnp.float32
        problem = make_problem(config, dtype)
        epsilons = jnp.asarray(config.epsilons, dtype)
        inits = initial_particles(config, dtype)
        points, area = polar_quadrature(q.radial_edges, q.nodes_per_panel, q.num_angles)
        points, log_area = jnp.asarray(points, dtype), jnp.log(jnp.asarray(area, dtype))
        log_weights, masses = jax.jit(density_weights)(points, log_area, problem)
        errors = jax.jit(jax.vmap(score_error, in_axes=(0, None, None, None)))(
            epsilons, points, log_weights["p"], problem)
        metrics_fn = jax.jit(jax.vmap(field_metrics, in_axes=(0, None, None, None, None)),
                             static_argnums=4)
        results = {"epsilons": list(config.epsilons), "score_error": np.asarray(errors).tolist(),
                   "quadrature": {"num_points": len(area),
                                  "mass": {k: float(v) for k, v in masses.items()}}, "fields": {}}
        arrays = {}
        for field in FIELDS:
            metrics = metrics_fn(epsilons, points, log_weights, problem, field)
            trajectories, readings, steps = jax.tree.map(np.asarray, simulate(
                epsilons, inits, problem, field, s.num_steps, s.step_size, s.step_size_exact,
                s.decay, config.threshold))
            results["fields"][field] = {
                **{name: np.asarray(value).tolist() for name, value in metrics.items()},
                "steps": {name: [[int(v) if v >= 0 else None for v in row] for row in value]
                          for name, value in steps.items()}}
            arrays[field] = {"trajectories": trajectories, "readings": readings,
                             "grid_score": _grid_score(config, problem, field, dtype)}
    return results, arrays


def _grid_score(config, problem: Problem, field: str, dtype) -> np.ndarray:
    """s at each plot eps [P] on a G x G grid of [-w, w]^2: returns [P, G, G, 2]."""
    axis = np.linspace(-config.plot.half_width, config.plot.half_width, config.plot.grid)
    grid = jnp.asarray(np.stack(np.meshgrid(axis, axis), -1), dtype)
    grid_score = jax.jit(jax.vmap(score, in_axes=(None, 0, None, None)), static_argnums=3)
    return np.asarray(grid_score(grid, jnp.asarray(config.plot.epsilons, dtype), problem, field))


def _mean_spread(values) -> str:
    """'mean ± std' over seeds of step counts (None = never), or how many never converged."""
    reached = [v for v in values if v is not None]
    if not reached:
        return "never"
    text = f"{np.mean(reached):.1f} ± {np.std(reached):.1f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "n/a (overflow)"


def table_markdown(results: dict, config) -> str:
    """The two result tables (field metrics; steps to converge) as Markdown."""
    fields = results["fields"]
    metrics = {"asym_p": "Asym_p", "nasym_p": "NAsym_p", "asym_mu": "Asym_mu",
               "nasym_mu": "NAsym_mu"}
    lines = [f"delta (floor) = {config.floor:g}, eps offset = {config.eps_offset:g}; "
             "score error = 1/2 E_p|u|^2; Asym and NAsym "
             "averaged under p (_p) and under mu (_mu) by quadrature.", "",
             "| eps | score error / eps | " + " | ".join(
                 f"{label} {f}" for label in metrics.values() for f in FIELDS) + " |",
             "|" + "---|" * (2 + len(metrics) * len(FIELDS))]
    for i, eps in enumerate(results["epsilons"]):
        ratio = "-" if eps == 0 else _number(results["score_error"][i] / eps)
        cells = [_number(fields[f][m][i]) for m in metrics for f in FIELDS]
        lines.append(f"| {eps:g} | {ratio} | " + " | ".join(cells) + " |")
    lines += ["", f"Steps until the particles' mean reading is below {config.threshold:g} "
              f"(mean ± std over {config.num_seeds} seeds; 'never' = not within "
              f"{config.sampling.num_steps} steps):", "",
              "| eps | " + " | ".join(f"{f} ({r})" for r in READINGS for f in FIELDS) + " |",
              "|" + "---|" * (1 + len(READINGS) * len(FIELDS))]
    for i, eps in enumerate(results["epsilons"]):
        cells = [_mean_spread(fields[f]["steps"][r][i]) for r in READINGS for f in FIELDS]
        lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_trajectories(path: str, config, results: dict, arrays: dict, seed_index: int = 0) -> str:
    """Unit arrows of s and one seed's particle paths; rows: config.plot.epsilons, columns:
    fields."""
    w, eps_list = config.plot.half_width, list(config.plot.epsilons)
    axis = np.linspace(-w, w, config.plot.grid)
    fig = Figure(figsize=(4.5 * len(FIELDS), 4.5 * len(eps_list) + 0.4), dpi=100)
    axes = fig.subplots(len(eps_list), len(FIELDS), squeeze=False)
    for row, eps in zip(axes, eps_list):
        eps_index = list(config.epsilons).index(eps)
        for ax, field in zip(row, FIELDS):
            values = arrays[field]["grid_score"][eps_list.index(eps)]
            unit = values / np.linalg.norm(values, axis=-1, keepdims=True)
            ax.quiver(axis, axis, unit[..., 0], unit[..., 1], color="0.6", width=0.003)
            paths = arrays[field]["trajectories"][eps_index, seed_index]  # [T + 1, N, 2]
            for j in range(paths.shape[1]):
                ax.plot(paths[:, j, 0], paths[:, j, 1], "-", linewidth=0.5, alpha=0.7)
            ax.plot(paths[0, :, 0], paths[0, :, 1], "ko", markersize=3)
            steps = results["fields"][field]["steps"]["clipped"][eps_index][seed_index]
            ax.set(xlim=(-w, w), ylim=(-w, w), aspect="equal",
                   title=f"{field}, eps={eps:g}: {'never' if steps is None else steps} steps")
    fig.suptitle("Unit arrows of s(x); paths x <- x + a_i s(x) from the black dots (one seed)")
    return _save(fig, path)


def plot_readings(path: str, config, arrays: dict) -> str:
    """Seed-mean clipped -log p of the particles against the step, one curve per eps."""
    fig = Figure(figsize=(5 * len(FIELDS), 4), dpi=100)
    for ax, field in zip(fig.subplots(1, len(FIELDS), sharey=True), FIELDS):
        curves = arrays[field]["readings"]["clipped"].mean(axis=1)  # [E, T + 1]
        for eps, curve in zip(config.epsilons, curves):
            ax.plot(np.arange(curve.size), curve, label=f"eps={eps:g}")
        ax.axhline(config.threshold, color="k", linestyle=":", linewidth=1)
        ax.set(yscale="log", xlabel="step i", title=field)
        ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.axes[0].set_ylabel("mean clipped -log p(x_i)")
    return _save(fig, path)


def _save(fig: Figure, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig).print_png(path)
    return path


def _json_ready(tree):
    """Non-finite floats become None (strict JSON)."""
    return jax.tree.map(lambda v: v if not isinstance(v, float) or math.isfinite(v) else None,
                        tree)


def write_outputs(workdir: str, config, results: dict, arrays: dict) -> list[str]:
    """Writes table.md, results.json, trajectories.png and nll.png; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    paths = [os.path.join(workdir, name) for name in ("table.md", "results.json")]
    with open(paths[0], "w") as f:
        f.write(table_markdown(results, config))
    with open(paths[1], "w") as f:
        json.dump(_json_ready({**results, "config": config.to_dict()}), f, indent=1)
    return paths + [plot_trajectories(os.path.join(workdir, "trajectories.png"), config, results,
                                      arrays),
                    plot_readings(os.path.join(workdir, "nll.png"), config, arrays)]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    start = time.perf_counter()
    results, arrays = run(config)
    results["wall_time_s"] = time.perf_counter() - start
    for path in write_outputs(flags.FLAGS.workdir, config, results, arrays):
        logging.info("Wrote %s", path)
    logging.info("Wall time %.1f s; results:\n%s", results["wall_time_s"],
                 table_markdown(results, config))


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/gaussian_example.py[:smoke]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
