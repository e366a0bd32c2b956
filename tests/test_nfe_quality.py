"""The NFE-quality experiments: the toy distance against closed forms and a tiny end to end;
the image curves on a Gaussian stand-in model with a stand-in feature network."""

import json
import os

import numpy as np
import pytest

from qcsbm_jax import fid, train
from qcsbm_jax.experiments import nfe_quality, nfe_quality_images, toy_sweep
from qcsbm_jax.fid import pipeline
from test_evaluate_images import (DIMS, _config, _gaussian_images, _save_checkpoint,
                                  tiny_image_data)


def test_sliced_wasserstein_of_shifted_gaussians():
    """N(0, I) against N(m, I) in 2D: every projection is shifted by theta.m, so
    SW2^2 = E(theta.m)^2 = |m|^2 / 2 (within the noise of 1024 random directions, about
    1% here); and 0 for a set against itself."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 2))
    m = np.array([3.0, -1.0])
    b = rng.standard_normal((20000, 2)) + m
    assert nfe_quality.sliced_wasserstein(a, b) == pytest.approx(np.linalg.norm(m) / np.sqrt(2),
                                                                 rel=0.04)
    assert nfe_quality.sliced_wasserstein(a, a) == 0.0
    with pytest.raises(ValueError, match="Equal-size"):
        nfe_quality.sliced_wasserstein(a, b[:10])


def test_settings_grid_and_seed_summary():
    grid = nfe_quality.settings_grid(["heun", "ode"], [5, 10], [1e-2])
    assert grid == [("heun", {"num_steps": 5}), ("heun", {"num_steps": 10}),
                    ("ode", {"rtol": 1e-2, "atol": 1e-2})]
    rows = {s: [dict(method="heun", num_steps=5, nfe=9.0, sw=0.1 * (s + 1), precision=0.9,
                     recall=0.8, failed=0)] for s in (0, 1)}
    summary = nfe_quality.summarise(rows)
    assert summary[0]["sw"]["mean"] == pytest.approx(0.15)
    assert summary[0]["sw"]["values"] == [0.1, 0.2] and summary[0]["num_steps"] == 5


@pytest.mark.slow
def test_end_to_end_on_a_tiny_sweep(tmp_path):
    sweep = str(tmp_path / "sweep")
    configs = toy_sweep.sweep_configs(["gaussians8"], ["usbm", "qcsbm"], [0, 1], "smoke",
                                      ("training.num_steps=20",))
    for name, config in configs.items():
        train.train(config, os.path.join(sweep, name))
    grid = nfe_quality.settings_grid(["pc", "ode"], [5, 10], [1e-1])
    results = nfe_quality.run(sweep, str(tmp_path / "out"), ["gaussians8"], ["usbm", "qcsbm"],
                              [0, 1], grid, num_samples=64)
    rows = results["gaussians8"]["families"]["qcsbm"]
    assert [r["method"] for r in rows] == ["pc", "pc", "ode"]
    assert rows[0]["nfe"]["mean"] == 5 + 1 and rows[1]["nfe"]["mean"] == 10 + 1
    assert all(len(r["sw"]["values"]) == 2 and r["sw"]["mean"] > 0 for r in rows)
    with open(tmp_path / "out" / "results.json") as f:
        assert json.load(f)["gaussians8"]["floor"] > 0
    assert os.path.getsize(tmp_path / "out" / "gaussians8.png") > 0


class _PixelFeatures(pipeline.FeatureNetwork):
    """Stands in for Inception (whose compilation the evaluator's tests already pay):
    features tanh(x W) of the pixels x in [0, 1] and a fixed W [D, 2048] ~ N(0, 1/16)."""

    def __init__(self, mesh, weights=None, batch_size=None):
        del weights, batch_size
        self.mesh, self.batch_size = mesh, 8
        self.weights = fid.Weights({}, "pixel-stand-in", "test")
        self._projection = np.random.default_rng(0).standard_normal((DIMS, 2048)) / 4

    def __call__(self, pixels):
        x = pixels.reshape(len(pixels), -1).astype(np.float64) / 255
        return {"pool_3": np.tanh(x @ self._projection).astype(np.float32)}


def test_image_curves_pair_the_runs_and_rank_a_wrong_score_last(tiny_image_data, tmp_path,
                                                                monkeypatch):
    """Two 'runs' of the Gaussian stand-in model, the exact score (scale 1) and a score half
    as strong (scale 0.5, samples too spread): per sampler setting and sampling seed, the
    exact one has the lower FID, the NFE are the samplers' own counts (with the denoising
    step), and the paired differences are the per-seed differences of the rows."""
    monkeypatch.setattr(fid, "FeatureNetwork", _PixelFeatures)
    # FID's mean term only: the 2048-d eigendecompositions (tests/test_fid_scores.py) would
    # take most of this test's time.
    monkeypatch.setattr(pipeline.scores, "fid",
                        lambda mu1, sigma1, mu2, sigma2: float(np.sum(np.square(mu1 - mu2))))
    config, runs = _config(), {}
    config.sampling.update(rho=7.0, corrector="none")  # Heun's time grid; no Langevin in 16-d
    for label, scale in (("exact", 1.0), ("weak", 0.5)):
        runs[label] = str(tmp_path / label)
        _save_checkpoint(config, runs[label], 1, scale)
    reference_images = _gaussian_images(64, True, seed=5)
    network = _PixelFeatures(None)
    stats_path = str(tmp_path / "reference.npz")
    fid.save_stats(stats_path, fid.reference_statistics(reference_images, network))
    grid = nfe_quality.settings_grid(["pc", "heun"], [4, 8], [])
    with pytest.warns(UserWarning, match="rank"):  # 32 images: singular covariances
        results = nfe_quality_images.run(runs, stats_path, str(tmp_path / "out"), grid,
                                         num_samples=32, seeds=[0, 1], params="raw")
    exact, weak = results["models"]["exact"], results["models"]["weak"]
    assert [(r["method"], r["num_steps"]) for r in exact] == [
        ("pc", 4), ("pc", 8), ("heun", 4), ("heun", 8)]
    assert [r["nfe"]["mean"] for r in exact] == [4 + 1, 8 + 1, 2 * 4 + 1, 2 * 8 + 1]
    for good, bad in zip(exact, weak):
        assert all(g < b for g, b in zip(good["fid"]["values"], bad["fid"]["values"]))
        assert 0 <= good["precision"]["mean"] <= 1 and np.isfinite(good["kid"]["mean"])
        # The weak score's samples leave [-1, 1]; they are clipped to pixels, not refused.
        assert bad["clipped"]["mean"] > good["clipped"]["mean"] and bad["failed"]["mean"] == 0
    paired = results["paired_fid"]["weak - exact"]
    for row, good, bad in zip(paired, exact, weak):
        np.testing.assert_allclose(row["fid"]["values"],
                                   np.subtract(bad["fid"]["values"], good["fid"]["values"]))
    assert "paired FID difference: weak - exact" in (tmp_path / "out" / "table.md").read_text()
    assert os.path.getsize(tmp_path / "out" / "fid.png") > 0


def test_image_curves_refuse_bad_runs_and_stats(tmp_path):
    with pytest.raises(ValueError, match="LABEL=DIR"):
        nfe_quality_images.parse_runs(["runs/a"])
    with pytest.raises(ValueError, match="twice"):
        nfe_quality_images.parse_runs(["u=a", "u=b"])
    stats_path = str(tmp_path / "no_features.npz")
    np.savez(stats_path, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.warns(UserWarning, match="weights"), pytest.raises(ValueError,
                                                                    match="--save_features"):
        nfe_quality_images.run({"u": "a"}, stats_path, str(tmp_path / "out"), [], 8, [0])
