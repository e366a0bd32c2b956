"""Evaluation of an image model (docs/method.md, experiment 3), on the test split (its
first eval.num_test images; 0 = all):

  bpd              bits/dim of the uniformly dequantized images, by the probability-flow
                   ODE (eval.divergence, 'hutchinson': one Rademacher probe per image)
  nll, nll_nfe     the same in nats (density of the model's inputs) and its NFE
  asym, nasym      one-probe Hutchinson estimates (one Rademacher probe and one noise draw
                   per test image and level, no sigma^2 weight) at eval.num_levels times;
                   per level the test-set mean of Asym and mean Asym / (2 mean ||J||_F^2)
                   (a ratio of unbiased means), then the mean over levels
  nfe              mean NFE of the eval.num_samples samples (config.sampling.method)
  fid_<method>, ...  with eval.fid_samples > 0: FID, KID, precision/recall, density/
                   coverage (and Inception Score) of samples per eval.fid_methods
                   method, and the protocol they were computed with (sample_quality.py)
Per-level values asym/level_i, nasym/level_i.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from qcsbm_jax import data, likelihood
from qcsbm_jax.data import images
from qcsbm_jax.evaluation import programs, sample_quality
from qcsbm_jax.evaluation.outputs import Evaluation
from qcsbm_jax.sampling import registry


def load_test_images(config, data_shape: tuple[int, ...]) -> np.ndarray:
    """The first eval.num_test (0: all) test images, uint8 [N, *data_shape], the same on
    every process."""
    test = data.image_split(config, "test")
    if config.eval.num_test:
        test = test[:config.eval.num_test]
    if tuple(test.shape[1:]) != tuple(data_shape):
        raise ValueError(f"The {config.data.name} test images have shape {test.shape[1:]}, "
                         f"but the model takes {tuple(data_shape)}; check data.name and the "
                         "model config.")
    return test


def make_image_evaluator(config, model, mesh, test_uint8: np.ndarray | None = None
                         ) -> Callable[[Any], Evaluation]:
    """evaluate_params(params) -> Evaluation with the image metrics (module doc), on
    test_uint8 (load_test_images when None)."""
    ev, centered = config.eval, config.data.centered
    if ev.divergence != "hutchinson":  # config.validate refuses it earlier on the CLI.
        raise ValueError(f"--config.eval.divergence={ev.divergence!r} needs one jvp per pixel "
                         "per ODE step; use 'hutchinson' for images.")
    if test_uint8 is None:
        test_uint8 = load_test_images(config, model.data_shape)
    test_float = np.asarray(images.to_float(test_uint8, centered), np.float32)
    dims = int(np.prod(model.data_shape))
    times = programs.evaluation_times(ev.num_levels, ev.eps)
    nll_fn = programs.make_nll_fn(model, mesh, divergence=ev.divergence, rtol=ev.rtol,
                                  atol=ev.atol, eps=ev.eps, batch_size=ev.batch_size,
                                  dequantize=True, centered=centered)
    asymmetry_fn = programs.make_hutchinson_asymmetry_fn(model, mesh, batch_size=ev.batch_size)
    sample_fn = registry.make_config_sampler(config.sampling, model, mesh)
    quality_fn = (sample_quality.make_sample_quality_fn(config, model, mesh)
                  if ev.fid_samples else None)

    def evaluate_params(params) -> Evaluation:
        nll, nll_nfe = nll_fn(params, programs.eval_key(ev.seed, programs.NLL_STREAM),
                              test_uint8)
        programs.finite_rows("likelihood", nll, "bpd is NaN")
        bpd = likelihood.bits_per_dim(nll, dims, data_scale=likelihood.image_data_scale(centered))
        results = {"bpd": float(np.mean(bpd)), "nll": float(np.mean(nll)),
                   "nll_nfe": float(np.mean(nll_nfe))}
        per_level = []
        for level, t in enumerate(times):
            key = programs.eval_key(ev.seed, programs.ASYMMETRY_STREAM, level)
            per_level.append(asymmetry_fn(params, key, test_float, t))
            logging.info("Asymmetry level %d/%d (t = %.5f): mean Asym %.4g", level + 1,
                         len(times), t, np.mean(per_level[-1][0]))
        if per_level:
            results.update(programs.asymmetry_summary(per_level))
        samples = np.zeros((0, *model.data_shape), np.float32)
        if ev.num_samples:
            samples, nfe = sample_fn(params, programs.eval_key(ev.seed, programs.SAMPLES_STREAM),
                                     ev.num_samples)
            results["nfe"] = float(np.mean(nfe))
        protocol = {}
        if quality_fn is not None:
            quality, protocol = quality_fn(params)
            results.update(quality)
        return Evaluation(results, times / model.sde.T, samples, None, protocol)

    return evaluate_params
