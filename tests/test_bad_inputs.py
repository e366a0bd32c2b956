"""Bad input is refused before anything is built or written, with one message naming the
setting, the file or the directory and what to do (the command-line side: test_main)."""

import gzip
import os

import numpy as np
import pytest

from qcsbm_jax import config as config_lib, experiment, main, train
from qcsbm_jax.data import images
from test_image_data import _write_idx
from test_train import _smoke


def _with(config, **overrides):
    with config.unlocked():
        for key, value in overrides.items():
            node, leaf = key.rsplit(".", 1) if "." in key else ("", key)
            (config if not node else config_lib._lookup(config, node))[leaf] = value
    return config


@pytest.mark.parametrize("key,value", [
    ("training.batch_size", 0), ("training.batch_size", -8), ("training.num_steps", 0),
    ("training.log_every", 0), ("training.checkpoint_every", 0),
    ("training.keep_checkpoints", 0), ("sampling.num_steps", 0), ("eval.batch_size", -1),
    ("loss.qc_every", 0), ("seed", -1)])
def test_counts_and_sizes_out_of_range_name_the_key(key, value):
    """Defects: batch sizes of 0 or -8 failed 20-30 s later deep in JAX; num_steps=0 with
    --mode=all then asked to train first; intervals of 0 would divide by zero."""
    config = _with(config_lib.toy_config("gaussians8", "qcsbm", "smoke"), **{key: value})
    expected = rf"^--config.{key}={value!r} is not valid; it must be an integer >= \d\.$"
    with pytest.raises(ValueError, match=expected):
        config_lib.validate(config)


@pytest.mark.parametrize("key,value,expected", [
    ("optim.learning_rate", 0.0, "> 0"), ("optim.ema_decay", 1.0, r"in \[0, 1\)"),
    ("sampling.rtol", -1e-3, "> 0"), ("loss.qc_fraction", 0.0, r"in \(0, 1\]")])
def test_rates_out_of_range_name_the_key(key, value, expected):
    config = _with(config_lib.toy_config("gaussians8", "qcsbm", "smoke"), **{key: value})
    with pytest.raises(ValueError, match=rf"--config.{key}={value!r} is not valid; it must "
                                         f"be {expected}"):
        config_lib.validate(config)


def test_loss_eps_may_be_zero_only_where_std_of_zero_is_positive():
    """t ~ U(0, 1) (the authors' 2D program) is fine under VE, where std(0) = sigma_min;
    VP and sub-VP have std(0) = 0, a division by zero in the DSM term."""
    toy = config_lib.toy_config("gaussians8", "usbm")
    assert toy.loss.eps == 0.0
    config_lib.validate(toy)
    vp = _with(config_lib.image_config("cifar10", "usbm", "smoke", model="ddpmpp"),
               **{"loss.eps": 0.0})
    with pytest.raises(ValueError, match=r"--config.loss.eps=0.0 is not valid.*VE"):
        config_lib.validate(vp)
    with pytest.raises(ValueError, match="loss.eps=-0.1"):
        config_lib.validate(_with(toy, **{"loss.eps": -0.1}))


def test_every_shipped_config_passes():
    for dataset in ("gaussians8", "checkerboard"):
        for variant in (None, "smoke"):
            config_lib.validate(config_lib.toy_config(dataset, "qcsbm", variant))
    for variant in (None, "small", "smoke"):
        for family in ("usbm", "qcsbm"):
            config_lib.validate(config_lib.image_config("cifar10", family, variant))


def test_batch_and_mesh_must_fit_the_devices():
    config = config_lib.toy_config("gaussians8", "qcsbm", "smoke")
    config_lib.check_devices(config, 8, 2)
    with pytest.raises(ValueError, match=r"batch_size=256 must be divisible by the number "
                                         r"of devices \(3\)"):
        config_lib.check_devices(config, 3)
    with pytest.raises(ValueError, match="data_axis=2 x --config.parallel.model_axis=1 does "
                                         "not match the 8 devices"):
        config_lib.check_devices(_with(config, **{"parallel.data_axis": 2}), 8)


def test_training_refuses_a_bad_batch_before_building_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "build_score_model", _must_not_build)
    for batch in (0, -8):
        with pytest.raises(ValueError, match=f"batch size {batch} must be positive"):
            train.train(_smoke("usbm", **{"training.batch_size": batch}), str(tmp_path))


def _must_not_build(config):
    raise AssertionError("the model was built before the input was checked")


def test_workdir_must_be_a_writable_directory(tmp_path):
    """Defect: a --workdir that is a regular file gave a raw FileExistsError."""
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ValueError, match=f"--workdir={regular} is a file, not a directory"):
        main._prepare_workdir(str(regular))
    with pytest.raises(ValueError, match=f"--workdir={regular}/run is not a directory this "
                                         "process can write in"):
        main._prepare_workdir(str(regular / "run"))
    assert main._prepare_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new/run")
    assert os.listdir(tmp_path / "new" / "run") == []  # The write probe leaves nothing.


@pytest.mark.parametrize("content", [b"garbage, not gzip", "truncated"])
def test_a_damaged_fashion_mnist_file_is_named_with_advice(tmp_path, content):
    """Defect: a bare BadGzipFile or EOFError, without the path."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    if content == "truncated":
        _write_idx(path, np.zeros((50, 28, 28)))
        path.write_bytes(path.read_bytes()[:-20])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        images.load_split("fashion_mnist", "train", fashion_mnist_dir=str(tmp_path))
    assert f"{path} is not a complete gzip file" in str(error.value)
    assert "--config.data.fashion_mnist_dir" in str(error.value)


def test_training_opens_the_data_before_building_the_model(tmp_path, monkeypatch):
    """Defect: data-set errors came only after the model was built (minutes for images)."""
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03")
    config = config_lib.image_config("fashion_mnist", "usbm", "smoke")
    with config.unlocked():
        config.data.fashion_mnist_dir = str(tmp_path)
    monkeypatch.setattr(experiment, "build_score_model", _must_not_build)
    with pytest.raises(ValueError, match="is not an IDX file"):
        train.train(config, str(tmp_path / "run"))
