"""Oracle score of a smoothed data set and improved precision/recall, against independent
float64 NumPy / SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

from qcsbm_jax import metrics


def _score_reference(x: np.ndarray, data: np.ndarray, sigma) -> np.ndarray:
    """Brute-force float64 score of the data set convolved with N(0, sigma^2 I)."""
    x, data = np.asarray(x, np.float64), np.asarray(data, np.float64)
    var = np.broadcast_to(np.asarray(sigma, np.float64) ** 2, (len(x),))[:, None]
    logits = -cdist(x, data, "sqeuclidean") / (2 * var)
    w = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    return (w @ data - x) / var


def _pr_reference(real: np.ndarray, fake: np.ndarray, k: int):
    """Kynkaanniemi et al. (2019) with full float64 distance matrices."""
    def coverage(queries, centres):
        radii = np.sort(cdist(centres, centres), axis=1)[:, k]  # column 0 is the point itself
        return np.mean(np.any(cdist(queries, centres) <= radii[None], axis=1))

    return coverage(fake, real), coverage(real, fake)


def _normal(seed: int, shape, scale=1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def test_pairwise_sq_dists():
    a, b = _normal(0, (37, 5), 3.0), _normal(1, (23, 5), 3.0)
    np.testing.assert_allclose(metrics.pairwise_sq_dists(a, b), cdist(a, b, "sqeuclidean"),
                               rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(metrics.pairwise_sq_dists(a, a)) >= 0)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 3.0, "per_row"])
def test_smoothed_score_matches_brute_force(sigma):
    x, data = _normal(0, (50, 3), 2.0), _normal(1, (300, 3), 2.0)
    if sigma == "per_row":
        sigma = np.geomspace(0.1, 3.0, len(x)).astype(np.float32)
    ref = _score_reference(x, data, sigma)
    for chunk in (64, 1000):  # several chunks with a padded tail, and a single chunk
        out = metrics.smoothed_empirical_score(x, data, sigma, chunk=chunk)
        assert out.shape == x.shape and out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_smoothed_score_far_from_data_is_stable():
    """Logits around -1e5: a naive softmax underflows; the score points to the nearest point."""
    data = _normal(1, (100, 2))
    x = np.array([[40.0, 30.0], [-50.0, 10.0]], np.float32)
    out = np.asarray(metrics.smoothed_empirical_score(x, data, 0.1, chunk=16))
    assert np.all(np.isfinite(out))
    ref = _score_reference(x, data, 0.1)
    np.testing.assert_allclose(out, ref, rtol=1e-4)
    nearest = data[np.argmin(cdist(x, data), axis=1)]
    np.testing.assert_allclose(out, (nearest - x) / 0.01, rtol=1e-4)


def test_smoothed_score_single_point_closed_form():
    x, point = _normal(2, (20, 4)), _normal(3, (1, 4))
    for sigma in (0.05, 1.0):
        np.testing.assert_allclose(metrics.smoothed_empirical_score(x, point, sigma),
                                   (point - x) / sigma**2, rtol=1e-5, atol=1e-5)


def test_smoothed_score_is_gradient_of_log_density():
    data = jnp.asarray(_normal(4, (20, 2)))
    x = jnp.asarray(_normal(5, (8, 2)))
    sigma = 0.6

    def log_density(y):  # log of the mean of N(y; data_i, sigma^2 I)
        log_normal = (-jnp.sum(jnp.square(y - data), axis=-1) / (2 * sigma**2)
                      - jnp.log(2 * jnp.pi * sigma**2))
        return jax.nn.logsumexp(log_normal) - jnp.log(len(data))

    grads = jax.vmap(jax.grad(log_density))(x)
    np.testing.assert_allclose(metrics.smoothed_empirical_score(x, data, sigma, chunk=8),
                               grads, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    real = _normal(6, (200, 3))
    fake = _normal(7, (150, 3)) + 2.0  # shifted: neither metric is near 0 or 1
    precision, recall = metrics.precision_recall(real, fake, k=k, chunk=64)
    ref_precision, ref_recall = _pr_reference(real, fake, k)
    assert 0.05 < ref_precision < 0.95 and 0.05 < ref_recall < 0.95
    np.testing.assert_allclose([precision, recall], [ref_precision, ref_recall], atol=1e-6)


def test_precision_recall_identical_sets_at_full_size():
    points = _normal(8, (5000, 2))
    np.testing.assert_allclose(metrics.precision_recall(points, points), (1.0, 1.0))


def test_precision_recall_disjoint_sets():
    real = _normal(9, (300, 2))
    np.testing.assert_allclose(metrics.precision_recall(real, real + 100.0, k=3), (0.0, 0.0))


def test_precision_recall_subset():
    """Fake points that are half of the real ones: all realistic, half the coverage."""
    real = _normal(10, (400, 2))
    precision, recall = metrics.precision_recall(real, real[:200], k=3)
    assert precision == 1.0
    assert 0.5 <= recall < 1.0
    np.testing.assert_allclose(recall, _pr_reference(real, real[:200], 3)[1], atol=1e-6)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than k"):
        metrics.precision_recall(_normal(0, (3, 2)), _normal(1, (10, 2)), k=3)


def _dc_reference(real: np.ndarray, fake: np.ndarray, k: int):
    """Naeem et al. (2020) with full float64 distance matrices."""
    radii = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    inside = cdist(real, fake) <= radii[:, None]  # [N real balls, M fake points]
    return inside.sum() / (k * len(fake)), np.mean(inside.any(axis=1))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_density_coverage_matches_brute_force(k):
    real = _normal(11, (200, 3))
    fake = _normal(12, (150, 3), 0.7) + 0.8  # concentrated and shifted: density far from 1
    density, coverage = metrics.density_coverage(real, fake, k=k, chunk=64)
    ref_density, ref_coverage = _dc_reference(real, fake, k)
    assert 0.05 < ref_coverage < 0.95 and abs(ref_density - 1) > 0.05
    np.testing.assert_allclose([density, coverage], [ref_density, ref_coverage], rtol=1e-6)


def test_density_coverage_of_the_real_set_itself():
    """Every ball holds its centre and its k nearest neighbours (no ties among random
    points), so the pairs number N (k + 1): density (k + 1) / k exactly; coverage 1."""
    real = _normal(13, (300, 4))
    density, coverage = metrics.density_coverage(real, real, k=5)
    np.testing.assert_allclose([density, coverage], [6 / 5, 1.0], rtol=1e-6)


def test_density_coverage_needs_more_than_k_real_points():
    with pytest.raises(ValueError, match="more than k"):
        metrics.density_coverage(_normal(0, (5, 2)), _normal(1, (10, 2)), k=5)
