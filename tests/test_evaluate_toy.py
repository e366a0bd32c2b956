"""Toy evaluation when some ODE solves fail: the metrics and plots are still written."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from qcsbm_jax import config as config_lib, experiment, parallel
from qcsbm_jax.evaluation import outputs, toy


def test_failed_ode_solves_are_reported_and_every_file_is_written(tmp_path, caplog):
    config = config_lib.toy_config("gaussians8", "usbm", "smoke")
    model = experiment.build_score_model(config)

    def failing_score_fn(params, x, t, key=None):
        # NaN right of x_0 = 1: the solves of the points that start or pass there fail.
        score = model.score_fn(params, x, t, key)
        return jnp.where(x[:, :1] > 1.0, jnp.nan, score)

    failing = dataclasses.replace(model, score_fn=failing_score_fn)
    evaluate_params = toy.make_toy_evaluator(config, failing, parallel.make_mesh())
    evaluation = evaluate_params(failing.init_params)

    results = evaluation.metrics
    failed = int(results["failed_samples"])
    assert 0 < failed < config.eval.num_samples
    assert np.isnan(results["nll"])
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
    assert "likelihood ODE solves failed" in caplog.text
    assert f"{failed} of {config.eval.num_samples} sampling ODE solves failed" in caplog.text

    outputs.write_evaluation(config, str(tmp_path), 0, evaluation)
    with open(os.path.join(tmp_path, "eval", "metrics.json")) as f:
        assert json.load(f)["failed_samples"] == failed
    assert os.path.getsize(os.path.join(tmp_path, "eval", "samples.png")) > 0
