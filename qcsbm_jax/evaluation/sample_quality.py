"""FID and its companions of an image model's samples, per sampler (docs/fid.md).

For each method of eval.fid_methods, eval.fid_samples samples (the 'eval' stream of
eval.seed, the same prior draws for every method) are scored against reference
statistics: eval.fid_stats when given (a stats file; pytorch-fid / TTUR files work),
else the training split's statistics (its first eval.fid_reference_images images; 0 = all,
the paper's protocol), computed once and cached in
$QCSBM_CACHE_DIR/fid_stats/<data>_train_<count>_<weights hash>.npz.
Samples are scored as the 8-bit pixels a saved sample holds (outputs.saved_pixels: values
outside the data range clipped, as score_sde does). Metrics per method m: fid_m, kid_m,
precision_m, recall_m, density_m, coverage_m, inception_score_m (weights with logits only)
and nfe_m; the protocol (sampler settings, sample count, EMA or raw parameters, reference,
weights hash, resize) goes beside them.
"""

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from qcsbm_jax import data, fid
from qcsbm_jax.evaluation import programs
from qcsbm_jax.evaluation.outputs import saved_pixels
from qcsbm_jax.fid import weights as fid_weights
from qcsbm_jax.sampling import registry

REPORTED = ("fid", "kid", "precision", "recall", "density", "coverage", "inception_score")


def _cached_stats_path(config, weights_hash: str, count: int) -> str:
    name = f"{config.data.name}_train_{count or 'all'}_{weights_hash[:12]}.npz"
    return os.path.join(fid_weights.cache_dir(), "fid_stats", name)


def reference_statistics(config, network: fid.FeatureNetwork) -> fid.Stats:
    """eval.fid_stats, or the training split's statistics (cached; module doc)."""
    ev = config.eval
    if ev.fid_stats:
        return fid.load_stats(ev.fid_stats, network.weights_hash, fid.RESIZE)
    path = _cached_stats_path(config, network.weights_hash, ev.fid_reference_images)
    if os.path.exists(path):
        return fid.load_stats(path, network.weights_hash, fid.RESIZE)
    train = data.image_split(config, "train")
    if ev.fid_reference_images:
        train = train[:ev.fid_reference_images]
    logging.info("FID reference: statistics of %d %s training images (cached at %s).",
                 len(train), config.data.name, path)
    stats = fid.reference_statistics(train, network)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fid.save_stats(path, stats)
    return fid.load_stats(path, network.weights_hash, fid.RESIZE) if os.path.exists(path) \
        else stats


def make_sample_quality_fn(config, model, mesh) -> Callable[[Any], tuple[dict, dict]]:
    """quality_fn(params) -> (metrics, protocol) for every method of eval.fid_methods."""
    ev = config.eval
    network = fid.FeatureNetwork(mesh)
    reference = reference_statistics(config, network)
    samplers = {method: registry.make_config_sampler(config.sampling, model, mesh, method)
                for method in ev.fid_methods}

    def quality_fn(params) -> tuple[dict, dict]:
        results, protocol = {}, {"params": ev.params, "samplers": {}}
        for method, sample_fn in samplers.items():
            samples, nfe = sample_fn(params, programs.eval_key(ev.seed, programs.SAMPLES_STREAM),
                                     ev.fid_samples)
            values, method_protocol = fid.sample_metrics(
                saved_pixels(samples, config), reference, network,
                label=f"FID samples ({method})")
            results.update({f"{name}_{method}": values[name] for name in REPORTED
                            if name in values})
            results[f"nfe_{method}"] = float(np.mean(nfe))
            protocol.update({k: v for k, v in method_protocol.items() if k != "num_images"})
            protocol["num_samples"] = method_protocol["num_images"]
            protocol["samplers"][method] = registry.settings_from_config(config.sampling,
                                                                         method)
            logging.info("Sample quality (%s, %d samples): %s", method, len(samples),
                         {k: v for k, v in results.items() if k.endswith(method)})
        return results, protocol

    return quality_fn
