"""The configs' defaults are the authors' programs (docs/method.md, "Differences from the
authors' code"), with the other choices one override away."""

import jax
import numpy as np
import pytest

from qcsbm_jax import checkpoint, config as config_lib, experiment
from qcsbm_jax.main import _load_config_file

HEADS = {"gaussians8": "leaky_relu", "checkerboard": "elu", "spirals2": "elu"}


@pytest.mark.parametrize("dataset", sorted(HEADS))
@pytest.mark.parametrize("family", ["csbm", "usbm", "qcsbm"])
def test_toy_defaults_are_the_authors_2d_program(dataset, family):
    config = config_lib.toy_config(dataset, family)
    assert config.model.init == "pytorch"
    assert config.model.head_activation == (HEADS[dataset] if family == "csbm" else "none")
    assert (config.loss.dsm_scale, config.loss.eps) == (1.0, 0.0)
    assert config.training.num_steps == (4000 if dataset == "checkerboard" else 2000)
    config_lib.validate(config)


def test_image_defaults_keep_the_half_and_eps():
    config = config_lib.image_config("cifar10", "qcsbm")
    assert (config.loss.dsm_scale, config.loss.eps, config.loss.qc_weight) == (0.5, 1e-5, 1e-4)


@pytest.mark.parametrize("key,value", [("model.init", "torch"),
                                       ("model.head_activation", "relu")])
def test_bad_toy_model_choice_is_refused(key, value):
    config = config_lib.toy_config("gaussians8", "csbm")
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=rf"--config.{key}='{value}' is not valid"):
        config_lib.validate(config)


def test_flax_style_choices_build_and_change_the_network():
    """init='flax' and head_activation='none' are the earlier program: other parameters
    (zero biases), another function for the same parameters."""
    authors = config_lib.toy_config("gaussians8", "csbm", "smoke")
    flax_style = config_lib.toy_config("gaussians8", "csbm", "smoke")
    flax_style.update_from_flattened_dict({"model.init": "flax",
                                           "model.head_activation": "none"})
    ours, theirs = (experiment.build_score_model(c) for c in (flax_style, authors))
    assert not np.any(ours.init_params["head"]["bias"])
    assert np.all(theirs.init_params["head"]["bias"] != 0)
    x, t = jax.random.normal(jax.random.key(0), (8, 2)) * 6, jax.numpy.full((8,), 0.3)
    assert not np.allclose(ours.score_fn(theirs.init_params, x, t),
                           theirs.score_fn(theirs.init_params, x, t))


def test_a_head_activation_is_part_of_the_checkpoint_signature():
    """A CSBM checkpoint written without the head activation does not restore into one
    with it (same shapes, another function); USBM signatures are unchanged."""
    old = config_lib.toy_config("gaussians8", "csbm", "smoke")
    old.model.head_activation = "none"
    new = config_lib.toy_config("gaussians8", "csbm", "smoke")
    params = experiment.build_score_model(new).init_params
    signature = lambda c: {"signature": experiment.model_signature(c, params)}
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="head_activation"):
        checkpoint.check_compatible(signature(old), signature(new))
    assert "head_activation" not in signature(config_lib.toy_config("gaussians8", "usbm"))[
        "signature"]


@pytest.mark.parametrize("variant,probes,batch", [("table2", 16, 8), ("tables3_4", 1, 128)])
def test_paper_fine_tunes_are_named_variants(variant, probes, batch):
    config = _load_config_file(f"configs/cifar10_qcsbm_ncsnpp.py:{variant}")
    config_lib.validate(config)
    assert (config.loss.qc_weight, config.loss.num_probes) == (1e-4, probes)
    assert config.training.batch_size == batch and config.training.num_steps == 100_000
    assert config.training.init_from == "runs/cifar10_usbm_ncsnpp"
    # Theirs restores the optimizer but not the step counter: the warm-up starts again.
    assert config.optim.warmup_steps == 5000
    assert config.model.nf == 128 and config.model.num_res_blocks == 8


def test_paper_fine_tunes_need_the_qc_family():
    with pytest.raises(ValueError, match="cifar10_qcsbm_ncsnpp.py:table2"):
        config_lib.image_config("cifar10", "usbm", "table2")
