"""The toy data sets (docs/method.md, experiment 2) and the resumable batch function.

Statistical checks use fixed keys (so they are deterministic) and bounds of about 5 standard
errors, or Kolmogorov-Smirnov p-values above 1e-3, so a correct generator passes with any
key while the wrong constants (scales, offsets, probabilities) fail.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from qcsbm_jax.data import toy

N = 20_000


def _sample(name: str, seed: int = 0, n: int = N) -> np.ndarray:
    return np.asarray(toy.sample_toy(name, jax.random.key(seed), n), np.float64)


def _assert_counts_uniform(counts: np.ndarray) -> None:
    """Multinomial counts with equal cell probabilities, within 5 standard deviations."""
    n, p = counts.sum(), 1 / len(counts)
    assert np.all(np.abs(counts - n * p) < 5 * math.sqrt(n * p * (1 - p))), counts


@pytest.mark.parametrize("name", toy.TOY_DATASETS)
def test_shape_dtype_determinism(name):
    a = toy.sample_toy(name, jax.random.key(3), 1000)
    assert a.shape == (1000, 2) and a.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(a, toy.sample_toy(name, jax.random.key(3), 1000))
    assert not np.allclose(a, toy.sample_toy(name, jax.random.key(4), 1000))
    jitted = jax.jit(toy.sample_toy, static_argnums=(0, 2))(name, jax.random.key(3), 1000)
    np.testing.assert_allclose(jitted, a, rtol=1e-5, atol=1e-5)


def test_names_and_unknown_name():
    assert toy.TOY_DATASETS == ("gaussians8", "spirals2", "checkerboard")
    with pytest.raises(ValueError, match="gaussians8.*spirals2.*checkerboard"):
        toy.sample_toy("moons", jax.random.key(0), 10)


def test_gaussians8_clusters():
    x = _sample("gaussians8")
    angles = np.arange(8) * np.pi / 4
    centres = 8 * np.stack([np.cos(angles), np.sin(angles)], axis=1) / np.sqrt(2)
    label = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    _assert_counts_uniform(np.bincount(label, minlength=8))
    std = 1 / np.sqrt(2)
    for k in range(8):
        cluster = x[label == k]
        # Centres 4.3 apart, 6 stds: mislabelled points are ~0.1 %.
        tol = 5 * std / math.sqrt(len(cluster))
        np.testing.assert_allclose(cluster.mean(0), centres[k], atol=tol)
        np.testing.assert_allclose(cluster.std(0), std, rtol=0.05)
    residual = x - centres[label]
    np.testing.assert_allclose(residual.std(0), std, rtol=0.02)
    assert stats.kstest(residual[:, 0] / std, "norm").pvalue > 1e-3


def test_checkerboard_support_and_uniformity():
    y = _sample("checkerboard") / 3  # back to the unscaled board [-2, 2]^2
    assert np.all(np.abs(y) <= 2)
    cell = np.floor(y).astype(int)
    assert np.all((cell.sum(1) % 2) == 0), "points on an empty square"
    occupied = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
    counts = np.array([np.sum(np.all(cell == c, axis=1)) for c in occupied])
    assert counts.sum() == len(y) and len(counts) == 8
    _assert_counts_uniform(counts)
    for coordinate in range(2):
        assert stats.kstest(y[:, coordinate] - cell[:, coordinate], "uniform").pvalue > 1e-3


def _spiral_fit(y: np.ndarray, num_grid: int = 10_000):
    """For unscaled points y [P, 2]: distance from s y - c(n) to the jitter box [0, 1/2]^2,
    minimised over n in [0, 3 pi] and s = +-1, with c(n) = (-n cos n, n sin n); also the
    arm s and the n whose box centre is nearest (an estimate of n)."""
    n = np.linspace(0, 3 * np.pi, num_grid)
    curve = np.stack([-n * np.cos(n), n * np.sin(n)], axis=1)
    best = np.full(len(y), np.inf)
    arm, n_hat = np.zeros(len(y)), np.zeros(len(y))
    for start in range(0, len(y), 100):
        rows = slice(start, start + 100)
        for s in (1.0, -1.0):
            r = s * y[rows, None] - curve[None]
            box = np.linalg.norm(np.maximum(np.maximum(-r, r - 0.5), 0), axis=-1).min(1)
            nearest = n[np.argmin(((r - 0.25) ** 2).sum(-1), axis=1)]
            better = box < best[rows]
            best[rows] = np.where(better, box, best[rows])
            arm[rows] = np.where(better, s, arm[rows])
            n_hat[rows] = np.where(better, nearest, n_hat[rows])
    return best, arm, n_hat


def test_spirals_support_symmetry_and_radius():
    scale = 2.3 / 3
    x = _sample("spirals2", n=1000)
    radius = np.linalg.norm(x, axis=1)
    max_radius = scale * (3 * np.pi + np.sqrt(2) / 2)
    assert radius.max() <= max_radius and radius.max() > 0.95 * scale * 3 * np.pi
    # Every point lies on one of the two arms (grid error <= speed 9.5 x half-step 4.7e-4).
    distance, arm, n_hat = _spiral_fit(x / scale)
    assert distance.max() < 1e-2, distance.max()
    # The arms are each other's negation, chosen with probability 1/2 (count where they are
    # far apart); n = 3 pi sqrt(U) means (n / 3 pi)^2 is uniform.
    outer = n_hat > 3
    _assert_counts_uniform(np.array([np.sum(arm[outer] > 0), np.sum(arm[outer] < 0)]))
    assert stats.kstest((n_hat / (3 * np.pi)) ** 2, "uniform").pvalue > 1e-3
    # Symmetry of the whole set under negation: same radius distribution on both arms.
    assert stats.ks_2samp(radius[arm > 0], radius[arm < 0]).pvalue > 1e-3


def _index_dataset(n: int) -> jax.Array:
    """Row i is (i, -i), so a batch tells which rows it holds."""
    i = jnp.arange(n, dtype=jnp.float32)
    return jnp.stack([i, -i], axis=1)


def test_toy_batch_depends_only_on_key_and_step():
    data, key = _index_dataset(50), jax.random.key(7)
    forward = {step: toy.toy_batch(data, key, step, 32) for step in range(5)}
    for step in (4, 2, 0, 3, 1):  # any order, as after a resume
        np.testing.assert_array_equal(toy.toy_batch(data, key, step, 32), forward[step])
    assert forward[0].shape == (32, 2)
    assert not np.array_equal(forward[0], forward[1])
    assert not np.array_equal(forward[0], toy.toy_batch(data, jax.random.key(8), 0, 32))
    np.testing.assert_array_equal(  # NumPy data give the same batch
        toy.toy_batch(np.asarray(data), key, 3, 32), forward[3])


def test_toy_batch_rows_are_uniform_draws():
    data = _index_dataset(10)
    batch = np.asarray(toy.toy_batch(data, jax.random.key(0), 0, 10_000))
    assert np.all(batch[:, 1] == -batch[:, 0])
    index = batch[:, 0].astype(int)
    assert index.min() >= 0 and index.max() <= 9
    _assert_counts_uniform(np.bincount(index, minlength=10))


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_toy_batch_process_slices(process_count):
    data, key = _index_dataset(100), jax.random.key(1)
    whole = toy.toy_batch(data, key, 11, 64)
    slices = [toy.toy_batch(data, key, 11, 64, p, process_count) for p in range(process_count)]
    assert all(s.shape == (64 // process_count, 2) for s in slices)
    np.testing.assert_array_equal(np.concatenate(slices), whole)


def test_toy_batch_errors():
    data, key = _index_dataset(10), jax.random.key(0)
    with pytest.raises(ValueError, match="divisible"):
        toy.toy_batch(data, key, 0, 10, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        toy.toy_batch(data, key, 0, 8, 2, 2)
