"""Image evaluation: bits/dim, Hutchinson Asym/NAsym, per-example randomness, outputs, watching.

Models with closed forms stand in for NCSN++, and a tiny in-memory data set (4 x 4 x 1
"images") for the tfds pipeline:
- Gaussian data N(mu, C) in model space under the VE SDE: the marginals are
  N(mu, S_t), S_t = C + sigma(t)^2 I, the score is -S_t^-1 (x - mu), and the
  probability-flow ODE is z = mu + S_T^(1/2) S_eps^(-1/2) (x - mu), so the model's
  log p(x) = log N(z; 0, sigma_max^2 I) + log det(S_T^(1/2) S_eps^(-1/2)).
- A linear field s(x, t) = A x / std(t)^2: Asym = 1/2 ||A - A^T||_F^2 / std^4 and
  NAsym = (1/4 ||A - A^T||_F^2) / ||A||_F^2 at every x.
"""

import json
import math
import os
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from qcsbm_jax import checkpoint, data, experiment, parallel, streams, train
from qcsbm_jax.data import images
from qcsbm_jax.evaluation import programs, runner
from qcsbm_jax.fid import weights as fid_weights
from qcsbm_jax.sde import VESDE

SHAPE = (4, 4, 1)
DIMS = math.prod(SHAPE)
SDE = VESDE(sigma_min=0.01, sigma_max=1.0)
EPS = 1e-5


def _gaussian(centered: bool, seed: int = 0):
    """(mu [D], eigenvectors Q [D, D], eigenvalues lam [D]) of a correlated image Gaussian
    with pixel std about 0.1 in [0, 1] units, in model space ([-1, 1] when centered)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((DIMS, DIMS)))
    lam = rng.uniform(0.005, 0.012, DIMS)
    return (0.0 if centered else 0.5) * np.ones(DIMS), q, lam * (4.0 if centered else 1.0)


def _gaussian_model(mu, q, lam) -> experiment.ScoreModel:
    """The exact score of N(mu, Q diag(lam) Q^T) perturbed by the VE SDE, times
    params['scale'] (1 for the exact score)."""
    mu_j, q_j, lam_j = (jnp.asarray(a, jnp.float32) for a in (mu, q, lam))

    def score_fn(params, x, t, key=None):
        del key
        coords = (x.reshape(len(x), -1) - mu_j) @ q_j
        scaled = coords / (lam_j + jnp.square(SDE.sigma(t))[:, None])
        return -params["scale"] * (scaled @ q_j.T).reshape(x.shape)

    return experiment.ScoreModel(SDE, score_fn, {"scale": np.float32(1.0)}, SHAPE)


def _linear_model(matrix) -> experiment.ScoreModel:
    """s(x, t) = A x / std(t)^2 on flattened images, A = matrix [D, D]; no parameters."""
    a = jnp.asarray(matrix, jnp.float32)

    def score_fn(params, x, t, key=None):
        del params, key
        flat = x.reshape(len(x), -1) @ a.T
        return (flat / jnp.square(SDE.std(t))[:, None]).reshape(x.shape)

    return experiment.ScoreModel(SDE, score_fn, {}, SHAPE)


def _exact_log_density(x, mu, q, lam) -> np.ndarray:
    """log p(x) [N] of the Gaussian model at time EPS (module doc), float64."""
    sigma = lambda t: SDE.sigma_min * (SDE.sigma_max / SDE.sigma_min) ** t
    ratio = np.sqrt((lam + sigma(1.0) ** 2) / (lam + sigma(EPS) ** 2))
    coords = (np.asarray(x, np.float64).reshape(len(x), -1) - mu) @ q
    z = mu + (coords * ratio) @ q.T
    return stats.norm.logpdf(z, scale=SDE.sigma_max).sum(axis=1) + np.log(ratio).sum()


def _quantize(y, centered: bool) -> np.ndarray:
    """uint8 images of model-space values y [N, D]."""
    unit = (y + 1) / 2 if centered else y
    return np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8).reshape(-1, *SHAPE)


def _gaussian_images(count: int, centered: bool, seed: int = 1) -> np.ndarray:
    mu, q, lam = _gaussian(centered)
    y = mu + (np.random.default_rng(seed).standard_normal((count, DIMS)) * np.sqrt(lam)) @ q.T
    return _quantize(y, centered)


def _config(**eval_overrides) -> ml_collections.ConfigDict:
    """An image config with the keys evaluate reads, sized for CPU tests."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="tiny_images", data_dir="", fashion_mnist_dir="unused", centered=True,
                  random_flip=False)
    c.sde = dict(name="ve", sigma_min=SDE.sigma_min, sigma_max=SDE.sigma_max)
    c.model = dict(name="gaussian_stand_in", family="unconstrained", output="scaled")
    c.optim = dict(learning_rate=1e-3, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999,
                   adam_eps=1e-8, ema_decay=0.0)
    c.training = dict(num_steps=3)
    c.eval = dict(batch_size=8, num_levels=2, eps=EPS, rtol=1e-4, atol=1e-4,
                  divergence="hutchinson", num_test=0, num_samples=4, seed=1, watch=False,
                  watch_timeout=120, params="raw", output_dir="eval", fid_samples=0)
    c.sampling = dict(method="ode", num_steps=4, snr=0.16, denoise=True,
                      predictor="reverse_diffusion", corrector="langevin", corrector_steps=1,
                      rtol=1e-3, atol=1e-3, eps=1e-3, batch_size=8, num_samples=8)
    c.parallel = dict(data_axis=-1, model_axis=1)
    c.eval.update(eval_overrides)
    return c


def _nll_fn(config, model, mesh, centered: bool):
    ev = config.eval
    return programs.make_nll_fn(model, mesh, divergence=ev.divergence, rtol=ev.rtol,
                                atol=ev.atol, eps=ev.eps, batch_size=ev.batch_size,
                                dequantize=True, centered=centered)


def _mesh(devices: int):
    return parallel.make_mesh(devices=jax.devices()[:devices])


@pytest.mark.parametrize("centered", [False, True])
def test_bits_per_dim_of_gaussian_images(centered):
    """ODE NLLs with one Rademacher probe per example scatter around the exact -log p of
    the dequantized inputs, with mean error within 4 standard errors."""
    mu, q, lam = _gaussian(centered)
    model = _gaussian_model(mu, q, lam)
    config = _config(batch_size=64, rtol=1e-5, atol=1e-5)
    config.data.centered = centered
    pixels = np.repeat(_gaussian_images(2, centered), 32, axis=0)  # 32 probes per image
    base = programs.eval_key(1, programs.NLL_STREAM)
    nll, nfe = _nll_fn(config, model, _mesh(8), centered)(model.init_params, base, pixels)
    keys = streams.example_keys(base, len(pixels))
    x, _ = programs.likelihood_inputs(keys, pixels, divergence="hutchinson",
                                      dequantize=True, centered=centered)
    error = nll - (-_exact_log_density(x, mu, q, lam))
    assert nll.shape == nfe.shape == (64,) and np.all(nfe > 10)
    assert error.std() > 0.05  # the probes matter: the drift Jacobian is not diagonal
    assert abs(error.mean()) < 4 * error.std() / math.sqrt(len(error)) + 1e-3
    # The inputs are the images' cells: (k + [0, 1)) / 256, mapped to [-1, 1) if centered.
    unit = (np.asarray(x) + 1) / 2 if centered else np.asarray(x)
    assert np.all((unit * 256 >= pixels - 1e-3) & (unit * 256 <= pixels + 1 + 1e-3))


def test_hutchinson_asymmetry_of_a_linear_field():
    """Per-level Asym and NAsym of s = A x / std(t)^2 against the closed forms, within 5
    standard errors of the one-probe estimates; exactly 0 for a symmetric A."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((DIMS, DIMS))
    config = _config(num_levels=3, batch_size=128)
    times = programs.evaluation_times(3, EPS)
    x0 = rng.uniform(-1, 1, (256, *SHAPE)).astype(np.float32)
    std = np.asarray(SDE.std(jnp.asarray(times)), np.float64)
    quadratic_variance = lambda m: 2 * (np.sum(m**2) - np.sum(np.diag(m) ** 2))

    def run(matrix):
        level_fn = programs.make_hutchinson_asymmetry_fn(_linear_model(matrix), _mesh(8),
                                                         batch_size=config.eval.batch_size)
        return programs.asymmetry_summary([
            level_fn({}, programs.eval_key(1, programs.ASYMMETRY_STREAM, i), x0, times[i])
            for i in range(3)])

    results = run(a)
    b = a.T - a
    asym_m, frob_m = 0.5 * b.T @ b, a @ a.T  # Asym = v^T asym_m v, ||J^T v||^2 = v^T frob_m v
    nasym = 0.25 * np.sum(b**2) / np.sum(a**2)
    se_asym = math.sqrt(quadratic_variance(asym_m) / len(x0)) / np.trace(asym_m)
    se_frob = math.sqrt(quadratic_variance(frob_m) / len(x0)) / np.trace(frob_m)
    for i in range(3):
        exact = 0.5 * np.sum(b**2) / std[i] ** 4
        np.testing.assert_allclose(results[f"asym/level_{i}"], exact, rtol=5 * se_asym)
        np.testing.assert_allclose(results[f"nasym/level_{i}"], nasym,
                                   rtol=5 * (se_asym + se_frob))
    assert results["asym"] == pytest.approx(np.mean([results[f"asym/level_{i}"]
                                                     for i in range(3)]))
    assert results["nasym"] == pytest.approx(np.mean([results[f"nasym/level_{i}"]
                                                      for i in range(3)]))
    symmetric = run(a + a.T)
    for i in range(3):
        assert symmetric[f"asym/level_{i}"] == pytest.approx(0.0, abs=1e-4 / std[i] ** 4)
        assert symmetric[f"nasym/level_{i}"] == pytest.approx(0.0, abs=1e-7)


def test_per_example_results_do_not_depend_on_devices_or_batches():
    """1 device with batch 3 and 8 devices with batch 8 give the same value for each of
    10 examples (neither batch divides 10, so the last chunks are padded). Values agree to
    rounding (XLA's kernels differ with the per-device batch), NLLs to the ODE tolerance,
    far below the spread that probes or noise drawn per batch would cause."""
    gaussian = _gaussian_model(*_gaussian(True))
    linear = _linear_model(np.random.default_rng(4).standard_normal((DIMS, DIMS)))
    pixels = _gaussian_images(10, True)
    x0 = images.to_float(pixels, centered=True)
    outputs = []
    for devices, batch in ((1, 3), (8, 8)):
        config, mesh = _config(batch_size=batch), _mesh(devices)
        nll, nfe = _nll_fn(config, gaussian, mesh, True)(
            gaussian.init_params, programs.eval_key(1, programs.NLL_STREAM), pixels)
        asym, frob = programs.make_hutchinson_asymmetry_fn(linear, mesh, batch_size=batch)(
            {}, programs.eval_key(1, programs.ASYMMETRY_STREAM, 1), x0,
            programs.evaluation_times(2, EPS)[1])
        outputs.append((nll, nfe, asym, frob))
    (nll, nfe, asym, frob), (nll_8, nfe_8, asym_8, frob_8) = outputs
    assert nll.shape == nfe.shape == asym.shape == frob.shape == (10,)
    np.testing.assert_allclose(nll, nll_8, rtol=0, atol=1e-3)
    assert np.all(np.abs(nfe - nfe_8) <= 6)  # at most one step attempt apart
    np.testing.assert_allclose(asym, asym_8, rtol=1e-5)
    np.testing.assert_allclose(frob, frob_8, rtol=1e-5)
    assert np.std(nll) > 0.1 and np.std(asym) > 0.05 * np.mean(asym)  # per-example draws


def test_bucket_size_avoids_padding_to_a_large_batch_and_new_compiles():
    mesh = _mesh(8)
    sizes = [parallel.bucket_size(n, 500, mesh) for n in (64, 10, 1, 1000, 40, 33, 65)]
    assert sizes == [64, 16, 8, 500, 64, 64, 128]
    assert parallel.bucket_size(10, 3, _mesh(1)) == 3
    assert parallel.bucket_size(5, 64, _mesh(1)) == 8


@pytest.fixture
def tiny_image_data(monkeypatch):
    """A data set 'tiny_images' of 12 test images, and the Gaussian model as the model."""
    test_images = _gaussian_images(12, True, seed=3)

    def load_split(name, split, *, data_dir, fashion_mnist_dir, process_index, process_count):
        assert (name, split, process_index, process_count) == ("tiny_images", "test", 0, 1)
        assert data_dir is None and fashion_mnist_dir == "unused"
        return test_images

    monkeypatch.setitem(data.REGISTRY, "tiny_images", data.DataSet("tiny_images", "image", SHAPE))
    monkeypatch.setattr(images, "load_split", load_split)
    model = _gaussian_model(*_gaussian(True))
    monkeypatch.setattr(experiment, "build_score_model", lambda config: model)
    return test_images


def _save_checkpoint(config, workdir, step: int, scale: float) -> None:
    model = experiment.build_score_model(config)
    params = {"scale": np.float32(scale)}
    state = train.init_state(params, train.make_optimizer(config.optim), config.seed)
    metadata = {"config": config.to_dict(),
                "signature": experiment.model_signature(config, model.init_params)}
    with checkpoint.Checkpointer(workdir, max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(step, state.replace(step=jnp.int32(step)), metadata=metadata)


def _wait_for(path: str, deadline: float) -> bool:
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _read(path):
    with open(path) as f:
        return json.load(f)


def _open_png(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_watcher_evaluates_new_checkpoints_until_the_last_step(tiny_image_data, tmp_path):
    """Checkpoints 1..3 are written from a thread after the watcher starts, each once the
    previous one was evaluated (with max_to_keep=1 the trainer deletes old steps); the
    watcher evaluates each, stops at training.num_steps = 3, and a rerun skips done steps."""
    config = _config(watch=True, num_test=10)
    workdir, out = str(tmp_path), str(tmp_path / "eval")
    failures = []

    def trainer():
        deadline = time.monotonic() + 300
        for step, scale in ((1, 0.5), (2, 0.8), (3, 1.0)):
            _save_checkpoint(config, workdir, step, scale)
            if not _wait_for(os.path.join(out, f"metrics_{step}.json"), deadline):
                failures.append(step)
                return

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    results = runner.evaluate(config, workdir)
    thread.join(timeout=60)
    assert not failures and not thread.is_alive()
    steps = [_read(os.path.join(out, f"metrics_{s}.json")) for s in (1, 2, 3)]
    assert [m["step"] for m in steps] == [1.0, 2.0, 3.0]
    assert results == steps[-1] == _read(os.path.join(out, "metrics.json"))
    assert len({m["bpd"] for m in steps}) == 3  # each checkpoint's own parameters

    final = steps[-1]
    scale = math.log(2.0)  # centered data: model space = 2 x - 1
    assert final["bpd"] == pytest.approx(
        (final["nll"] - DIMS * scale) / (DIMS * math.log(2)) + 8, rel=1e-6)
    for key in ("nll_nfe", "nfe", "asym", "nasym", "asym/level_0", "nasym/level_1"):
        assert np.isfinite(final[key]), key
    assert 0 <= final["nasym"] <= 1 and final["asym"] == pytest.approx(
        (final["asym/level_0"] + final["asym/level_1"]) / 2)

    assert _open_png(os.path.join(out, "asymmetry.png")).size == (600, 400)
    grid = _open_png(os.path.join(out, "samples_3.png"))
    assert grid.mode == "L" and grid.size == (2 * 6 + 2, 2 * 6 + 2)  # 4 samples, 2 x 2
    with np.load(os.path.join(out, "samples.npz")) as saved:
        assert saved["samples"].shape == (4, *SHAPE) and int(saved["step"]) == 3
        assert saved["images"].dtype == np.uint8 and saved["images"].shape == (4, *SHAPE)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    assert os.listdir(os.path.join(out, "snapshot", "checkpoints")) == []  # released

    # A rerun finds every step evaluated; after losing step 3's metrics (a killed
    # evaluator) it evaluates step 3 again and nothing else.
    stamps = {s: os.stat(os.path.join(out, f"metrics_{s}.json")).st_mtime_ns for s in (1, 2, 3)}
    assert runner.evaluate(config, workdir) == {}
    os.remove(os.path.join(out, "metrics_3.json"))
    again = runner.evaluate(config, workdir)
    assert again["step"] == 3.0 and again["bpd"] == pytest.approx(final["bpd"], rel=1e-6)
    for s in (1, 2):
        assert os.stat(os.path.join(out, f"metrics_{s}.json")).st_mtime_ns == stamps[s]


def test_watcher_gives_up_after_the_timeout(tiny_image_data, tmp_path):
    config = _config(watch=True, watch_timeout=1)
    start = time.monotonic()
    assert runner.evaluate(config, str(tmp_path)) == {}
    assert time.monotonic() - start < 30
    assert not os.path.exists(tmp_path / "eval" / "metrics.json")


def test_sample_mode_writes_an_image_grid(tiny_image_data, tmp_path):
    config = _config()
    config.sampling.update(method="pc", num_samples=5, num_steps=3)
    _save_checkpoint(config, str(tmp_path), 2, 1.0)
    path = runner.sample(config, str(tmp_path))
    assert path == os.path.join(tmp_path, "samples", "pc.npz")
    with np.load(path) as saved:
        assert saved["samples"].shape == (5, *SHAPE)
        assert saved["images"].dtype == np.uint8
        assert np.all(saved["nfe"] == 3 * 2 + 1) and str(saved["method"]) == "pc"
        assert json.loads(str(saved["settings"]))["num_steps"] == 3
    grid = _open_png(os.path.join(tmp_path, "samples", "pc.png"))
    assert grid.size == (3 * 6 + 2, 2 * 6 + 2)  # 5 samples: 3 columns, 2 rows


def test_unknown_data_set_is_one_clear_error(tiny_image_data):
    config = _config()
    config.data.name = "cifar11"
    with pytest.raises(ValueError, match="cifar11.*tiny_images"):
        data.of(config)


@pytest.mark.skipif(not fid_weights.available(), reason="no Inception weights (docs/fid.md)")
def test_image_evaluation_scores_samples_of_each_sampler(tiny_image_data, tmp_path):
    """eval.fid_samples > 0: FID and its companions per eval.fid_methods method against a
    stats file, with the protocol in metrics.json."""
    from qcsbm_jax import fid

    network = fid.FeatureNetwork(_mesh(8))
    stats_path = str(tmp_path / "reference.npz")
    fid.save_stats(stats_path, fid.reference_statistics(tiny_image_data, network))
    config = _config(num_test=4, num_levels=1, fid_samples=24, fid_methods=("pc", "ode"),
                     fid_stats=stats_path, fid_reference_images=0)
    config.sampling.update(num_steps=3)
    _save_checkpoint(config, str(tmp_path), 1, 1.0)
    with pytest.warns(UserWarning):  # 24 samples: a singular covariance, still computed
        results = runner.evaluate(config, str(tmp_path))
    for method, nfe in (("pc", 3 * 2 + 1), ("ode", None)):
        assert np.isfinite(results[f"fid_{method}"]) and results[f"fid_{method}"] >= 0
        for name in ("kid", "precision", "recall", "density", "coverage"):
            assert np.isfinite(results[f"{name}_{method}"]), (name, method)
        assert results[f"nfe_{method}"] == nfe if nfe else results[f"nfe_{method}"] > 0
    written = _read(os.path.join(tmp_path, "eval", "metrics.json"))
    protocol = written["protocol"]
    assert protocol["num_samples"] == 24 and protocol["params"] == "raw"
    assert protocol["stats_file"] == stats_path and protocol["weights_hash"]
    assert protocol["samplers"]["pc"]["num_steps"] == 3 and "rtol" in protocol["samplers"]["ode"]
