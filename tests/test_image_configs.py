"""Image configs: every file loads and validates in every variant, holds the paper's settings,
builds its network, and feeds training batches of the data set's shape."""

import glob
import inspect
import os

import jax
import numpy as np
import pytest

from qcsbm_jax import config as config_lib, data, experiment, losses
from qcsbm_jax.main import _load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*_ncsnpp.py"))
                       + glob.glob(os.path.join(ROOT, "configs", "*_ddpmpp.py")))


def test_one_config_per_data_set_and_family():
    names = {os.path.basename(p) for p in IMAGE_CONFIGS}
    for dataset in ("cifar10", "cifar100", "svhn", "imagenet32", "fashion_mnist"):
        for family in ("csbm", "usbm", "qcsbm"):
            assert f"{dataset}_{family}_ncsnpp.py" in names


@pytest.mark.parametrize("path", IMAGE_CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("variant", [None, "small", "smoke"])
def test_config_loads_and_validates(path, variant):
    config = _load_config_file(path + (f":{variant}" if variant else ""))
    config_lib.validate(config)
    dataset, family, model = os.path.basename(path)[:-3].rsplit("_", 2)
    assert config.data.name == dataset and config.model.name == model
    assert config.model.family == ("constrained" if family == "csbm" else "unconstrained")
    assert (config.loss.qc_weight > 0) == (family == "qcsbm")
    assert config.model.center_input == (not config.data.centered)
    with pytest.raises(AttributeError):
        config.training.num_stesp = 1  # Locked: a misspelt key is an error.


@pytest.mark.parametrize("key,value,valid", [
    ("sampling.predictor", "reverse_difusion", "euler_maruyama"),
    ("sampling.corrector", "ald", "langevin"),
    ("eval.divergence", "exact", "hutchinson"),  # exact: one jvp per pixel, images only
    ("loss.qc_gradient", "vjp", "jvp"),
])
def test_bad_sampler_or_divergence_is_refused_before_any_work(key, value, valid):
    config = config_lib.image_config("cifar10", "usbm", "smoke")
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=rf"--config.{key}='{value}' is not valid.*{valid}"):
        config_lib.validate(config)
    toy = config_lib.toy_config("gaussians8", "usbm", "smoke")
    toy.eval.divergence = "exact"
    config_lib.validate(toy)


def test_loss_keys_are_the_loss_functions_options():
    """train passes config.loss to losses.make_loss_fn as keyword arguments."""
    options = {name for name, p in inspect.signature(losses.make_loss_fn).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for config in (config_lib.toy_config("spirals2", "qcsbm"),
                   config_lib.image_config("cifar10", "qcsbm")):
        assert set(config.loss) == options


def test_paper_settings():
    """docs/method.md, experiment 3, for QC-NCSN++ on CIFAR-10 and its U-NCSN++ starting point."""
    qc = config_lib.image_config("cifar10", "qcsbm")
    u = config_lib.image_config("cifar10", "usbm")
    assert (qc.sde.name, qc.sde.sigma_min, qc.sde.sigma_max) == ("ve", 0.01, 50.0)
    assert qc.model.nf == 128 and tuple(qc.model.ch_mult) == (1, 2, 2, 2)
    assert qc.model.num_res_blocks == 8 and tuple(qc.model.attn_resolutions) == (16,)
    assert qc.model.resblock_type == "biggan" and qc.model.fir
    assert tuple(qc.model.fir_kernel) == (1, 3, 3, 1) and qc.model.skip_rescale
    assert qc.model.progressive_input == "residual"  # the authors' released models'
    assert qc.optim.ema_warmup is False and u.optim.ema_warmup is True
    assert (qc.model.embedding_type, qc.model.fourier_scale) == ("fourier", 16.0)
    assert qc.model.dropout == 0.1 and qc.model.output == "scaled"
    assert (qc.optim.learning_rate, qc.optim.warmup_steps, qc.optim.grad_clip,
            qc.optim.ema_decay) == (2e-4, 5000, 1.0, 0.999)
    assert qc.training.batch_size == 128 and not qc.data.centered
    assert (qc.loss.qc_weight, qc.loss.num_probes, qc.loss.probe) == (1e-4, 1, "rademacher")
    assert qc.training.num_steps == 100_000
    assert qc.training.init_from == "runs/cifar10_usbm_ncsnpp" and u.training.init_from == ""
    assert (qc.sampling.method, qc.sampling.num_steps, qc.sampling.snr,
            qc.sampling.denoise) == ("pc", 1000, 0.16, True)
    assert (qc.eval.num_levels, qc.eval.divergence, qc.eval.num_test) == (100, "hutchinson", 0)
    ddpm = config_lib.image_config("cifar10", "usbm", model="ddpmpp")
    assert ddpm.sde.name == "vp" and ddpm.model.embedding_type == "positional"
    assert ddpm.data.centered and not ddpm.model.center_input  # as score_sde's DDPM++


def test_small_qc_fine_tunes_the_small_usbm():
    small = config_lib.image_config("fashion_mnist", "qcsbm", "small")
    assert small.training.init_from == "runs/fashion_mnist_usbm_ncsnpp_small"


def test_bad_names_are_clear():
    with pytest.raises(ValueError, match="cifar10"):
        config_lib.image_config("mnist", "usbm")
    with pytest.raises(ValueError, match="csbm"):
        config_lib.image_config("cifar10", "vsbm")
    with pytest.raises(ValueError, match="small"):
        config_lib.image_config("cifar10", "usbm", "tiny")


def test_smoke_network_builds_and_preserves_shape():
    config = config_lib.image_config("svhn", "usbm", "smoke")
    model = experiment.build_score_model(config)
    assert model.data_shape == (32, 32, 3)
    x = np.zeros((2, 32, 32, 3), np.float32)
    out = model.score_fn(model.init_params, x, np.full((2,), 0.5, np.float32), None)
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


def test_fashion_mnist_training_batches(tmp_path):
    config = config_lib.image_config("fashion_mnist", "usbm", "smoke")
    if not os.path.isdir(config.data.fashion_mnist_dir):
        pytest.skip("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    batches = [data.make_train_batches(config, p, 2) for p in range(2)]
    halves = [b(3) for b in batches]
    for half in halves:
        assert half.shape == (config.training.batch_size // 2, 32, 32, 1)
        assert half.dtype == np.float32 and 0 <= half.min() and half.max() <= 1
    np.testing.assert_array_equal(batches[0](3), halves[0])  # a pure function of the step
    assert not np.array_equal(halves[0], halves[1])  # each process reads its own part


def test_image_path_end_to_end_on_mock_cifar10(tmp_path):
    """Train a smoke U-NCSN++ on mocked CIFAR-10, evaluate and sample it, then QC fine-tune
    it from its workdir (training.init_from), all through the library's entry points."""
    from qcsbm_jax import train
    from qcsbm_jax.evaluation import runner
    from qcsbm_jax.data import images

    tfds = images._tensorflow_datasets()
    usbm_dir, qc_dir = str(tmp_path / "usbm"), str(tmp_path / "qcsbm")
    with tfds.testing.mock_data(num_examples=16):
        usbm = config_lib.image_config("cifar10", "usbm", "smoke")
        state = train.train(usbm, usbm_dir)
        assert int(state.step) == usbm.training.num_steps
        metrics = runner.evaluate(usbm, usbm_dir)
        # Uniform dequantized data costs 8 bits/dim; an untrained model is far from it, but
        # the number must be a finite bound computed from every test example.
        assert np.isfinite(metrics["bpd"]) and metrics["bpd"] > 0
        assert 0 <= metrics["nasym"] <= 1 and metrics["asym"] > 0
        assert os.path.exists(os.path.join(usbm_dir, "eval", "samples.png"))

        qc = config_lib.image_config("cifar10", "qcsbm", "smoke")
        with qc.unlocked():
            qc.training.init_from = usbm_dir
            qc.training.num_steps = 2
        tuned = train.train(qc, qc_dir)
    assert int(tuned.step) == 2

    def distance(a, b):
        return sum(float(np.sum(np.square(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    with qc.unlocked():
        qc.seed = 1
    fresh = experiment.build_score_model(qc).init_params  # Another initialisation.
    # Started from the USBM's parameters (not a fresh initialisation), then trained.
    assert 0 < distance(tuned.params, state.params) < distance(fresh, state.params) / 100
