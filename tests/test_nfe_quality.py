"""The NFE-quality experiment: its distance against closed forms, and a tiny end to end."""

import json
import os

import numpy as np
import pytest

from qcsbm_jax import train
from qcsbm_jax.experiments import nfe_quality, toy_sweep


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
