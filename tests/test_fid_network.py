"""The Inception network against the reference TorchScript module run in torch
(tests/fixtures/fid/make_fixtures.py), sharded over 8 devices; sample_metrics and the
command line end to end on Fashion-MNIST. Needs the weights (skips without them)."""

import json
import os

import numpy as np
import pytest

from qcsbm_jax import parallel
from qcsbm_jax.data import images
from qcsbm_jax.fid import __main__ as cli
from qcsbm_jax.fid import pipeline, statistics, weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "fid", "expected.npz")


@pytest.fixture(scope="module")
def network():
    """The network on all 8 test devices, with the real feature weights and a random
    softmax layer (so the logits path and the Inception Score run too)."""
    try:
        real = weights.load()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(0)
    logits = {"kernel": (rng.standard_normal((2048, 1008)) / 30).astype(np.float32),
              "bias": rng.standard_normal(1008).astype(np.float32)}
    with_logits = weights.Weights({**real.params, "logits": logits}, real.weights_hash,
                                  real.source)
    return pipeline.FeatureNetwork(parallel.make_mesh(), with_logits)


@pytest.fixture(scope="module")
def fashion():
    try:
        return images.load_split("fashion_mnist", "test")[:16]
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def reference(network, fashion):
    """Statistics and features of the first 8 Fashion-MNIST test images."""
    return pipeline.reference_statistics(fashion[:8], network, keep_features=8)


def test_features_match_the_reference_torchscript_module(network):
    """6 fixed images (noise, patterns, flat, Fashion-MNIST), enlarged to 299 x 299 (where
    the resize is the identity), 8 devices: pool_3 within 1e-4 of its maximum."""
    with np.load(FIXTURE) as f:
        sources, want = f["sources"], f["features"]
    rows = np.arange(299) * sources.shape[1] // 299
    out = network(sources[:, rows][:, :, rows])
    assert out["pool_3"].shape == (6, 2048) and out["pool_3"].dtype == np.float32
    np.testing.assert_allclose(out["pool_3"], want, rtol=0, atol=1e-4 * np.abs(want).max())
    softmax_layer = network.weights.params["logits"]
    np.testing.assert_allclose(
        out["logits"], out["pool_3"].astype(np.float64) @ softmax_layer["kernel"]
        + softmax_layer["bias"], rtol=1e-5, atol=1e-5)


def test_sample_metrics_end_to_end(network, fashion, reference):
    """Samples equal to the reference images (as floats in [0, 1]): FID 0, precision,
    recall and coverage 1. Statistics of other weights: refused."""
    assert reference.num_images == 8 and reference.features.shape == (8, 2048)
    assert reference.weights_hash == network.weights_hash
    kid = dict(kid_subsets=3, kid_subset_size=8)
    with pytest.warns(UserWarning, match="8 images give a covariance of rank < 2048"):
        same, protocol = pipeline.sample_metrics(fashion[:8] / np.float32(255), reference,
                                                 network, value_range=(0, 1), **kid)
    assert abs(same["fid"]) < 1e-3
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["inception_score"] >= 1.0 and same["kid"] < 1e-3
    assert protocol == {"num_images": 8, "reference_images": 8, "feature_samples": 8,
                        "weights_hash": network.weights_hash, "weights_source": "fid_helper",
                        "resize": "tf1-bilinear-299", "stats_file": None}
    other_weights = statistics.Stats(reference.mu, reference.sigma, 8, "0" * 64)
    with pytest.raises(ValueError, match="differ in weights_hash"):
        pipeline.sample_metrics(fashion[8:16], other_weights, network)


def test_command_line_stats_and_score(network, fashion, reference, tmp_path, monkeypatch,
                                     capsys):
    monkeypatch.setattr(cli, "_network", lambda args: network)  # compiled once per module
    np.savez(tmp_path / "b.npz", images=fashion[8:16, ..., 0])  # no channel axis: refused
    stats_path = str(tmp_path / "a_stats.npz")
    assert cli.main(["stats", "fashion_mnist:test", stats_path, "--num_images=8",
                     "--save_features"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == 8
    stats = statistics.load(stats_path, network.weights_hash, "tf1-bilinear-299")
    np.testing.assert_allclose(stats.sigma, reference.sigma, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(stats.features, reference.features)
    assert cli.main(["score", str(tmp_path / "b.npz"), stats_path]) == 2
    assert "[N, H, W, C]" in capsys.readouterr().err
    np.savez(tmp_path / "b.npz", images=fashion[:8])
    with pytest.warns(UserWarning, match="rank < 2048"):
        assert cli.main(["score", str(tmp_path / "b.npz"), stats_path, "--kid_subsets=2",
                         "--kid_subset_size=8"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert abs(values["fid"]) < 1e-3 and values["recall"] == 1.0
    assert values["inception_score"] >= 1.0 and values["num_images_a"] == 8


def test_benchmark_script_runs(network, tmp_path, monkeypatch, capsys):
    """benchmarks/inception.py keeps working: its network rows and JSON, on 8 devices."""
    from benchmarks import inception
    monkeypatch.setattr(pipeline, "FeatureNetwork",
                        lambda mesh, batch_size: network)  # compiled once per module
    out = tmp_path / "bench.json"
    result = inception.main(["--batch", "8", "--devices", "8", "--repeats", "1",
                             "--skip_scores", "--json", str(out)])
    (row,) = result["rows"]
    assert row["row"] == "network" and row["batch"] == 8 and row["images_per_s"] > 0
    assert json.loads(out.read_text())["fid_s_per_1000"] == result["fid_s_per_1000"] > 0
    assert "| network | 8 | 8 |" in capsys.readouterr().out
