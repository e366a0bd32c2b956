"""Images to FID and its companions on the device mesh: the library entry of evaluators.

  network = FeatureNetwork(mesh)                      # weights found and jitted once
  reference = reference_statistics(train_uint8, network)  # or statistics.load(path, ...)
  statistics.save("reference.npz", reference)
  values, protocol = sample_metrics(samples, reference, network, value_range=(0, 1))

The feature network runs over the mesh as the samplers do: weights replicated, each batch
split over every device (parallel.per_shard), batches fed by parallel.map_batches (all
processes hold the same images; each feeds its own slice). Features stream into float64
sums block by block; only the first `keep_features` features (KID, precision/recall,
density/coverage) and the logits (Inception Score, N x 1008) are kept.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import numpy as np
from absl import logging
from flax import nnx

from qcsbm_jax import metrics, parallel
from qcsbm_jax.fid import preprocess, scores, statistics
from qcsbm_jax.fid import weights as weights_lib
from qcsbm_jax.fid.inception import InceptionV3

PER_DEVICE_BATCH = 64
BLOCK_BATCHES = 8  # Batches per map_batches call, between two updates of the sums.
FEATURE_SAMPLES = 10_000  # Features kept per set for KID, precision/recall, density/coverage.
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
IS_SPLITS = 10
PR_K, DC_K = 3, 5  # k of precision/recall (as the paper) and of density/coverage (Naeem).


class Described(NamedTuple):
    """One set of images through the network: statistics (with the first features) and
    the logits [N, 1008] when the weights carry them."""
    stats: statistics.Stats
    logits: np.ndarray | None


def inception_program(mesh, logits: bool):
    """(abstract state, fn(state, pixels [B, H, W, C] uint8) -> {'pool_3', 'logits'}):
    FeatureNetwork's jitted program, the batch split over the mesh."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(logits=logits)))

    def local(state, pixels):
        return nnx.merge(graphdef, state)(preprocess.inception_input(pixels))

    return state, jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=1))


class FeatureNetwork:
    """Inception on a mesh: uint8 pixels [B, H, W, C] -> {'pool_3' [B, 2048], 'logits'}.

    weights: from weights.load() when None. batch_size: images per device call (global,
    a multiple of the device and process counts; default PER_DEVICE_BATCH per device).
    """

    def __init__(self, mesh, weights: weights_lib.Weights | None = None,
                 batch_size: int | None = None):
        self.mesh = mesh
        self.weights = weights or weights_lib.load()
        self.batch_size = batch_size or PER_DEVICE_BATCH * mesh.size
        parallel.check_batch_size(self.batch_size, mesh, "Inception batch size")
        state, self._apply = inception_program(mesh, self.weights.has_logits)
        nnx.replace_by_pure_dict(state, self.weights.params)
        self._state = jax.device_put(state, parallel.replicated(mesh))

    @property
    def weights_hash(self) -> str:
        return self.weights.weights_hash

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs [N, ...] for checked uint8 pixels [N, H, W, C] (all of them at once)."""
        batch = min(self.batch_size, math.ceil(len(pixels) / self.mesh.size) * self.mesh.size)
        return parallel.map_batches(lambda x: self._apply(self._state, x), (pixels,), batch,
                                    self.mesh)

    def describe(self, images, *, value_range=None, keep_features: int = FEATURE_SAMPLES,
                 label: str = "Inception") -> Described:
        """Streams images (uint8, or floats in value_range: preprocess.to_pixels) through
        the network: statistics of all, features of the first keep_features, logits."""
        pixels = preprocess.to_pixels(images, value_range)
        sums, kept, logits = statistics.FeatureStats.empty(), [], []
        block = self.batch_size * BLOCK_BATCHES
        for start in range(0, len(pixels), block):
            out = self(pixels[start:start + block])
            sums.add(out["pool_3"])
            kept.append(out["pool_3"][:max(0, keep_features - start)])
            if "logits" in out:
                logits.append(out["logits"])
            logging.info("%s: features of %d/%d images", label, sums.count, len(pixels))
        stats = statistics.Stats(
            mu=sums.mu, sigma=sums.sigma, num_images=sums.count,
            weights_hash=self.weights_hash, resize=preprocess.RESIZE,
            features=np.concatenate(kept) if keep_features > 0 else None)
        return Described(stats, np.concatenate(logits) if logits else None)


def reference_statistics(images: np.ndarray, network: FeatureNetwork, *,
                         keep_features: int = FEATURE_SAMPLES) -> statistics.Stats:
    """Statistics of a data set's images (uint8 [N, H, W, C]; the training split for the
    paper's protocol), with the features of the first keep_features; save them with
    statistics.save or `python -m qcsbm_jax.fid stats`."""
    return network.describe(images, keep_features=keep_features, label="Reference").stats


def _check_comparable(stats: statistics.Stats, weights_hash: str | None, resize: str | None,
                      other: str) -> None:
    """Raises ValueError unless stats were made with these weights and resize (where known)."""
    for attribute, mine in (("weights_hash", weights_hash), ("resize", resize)):
        theirs = getattr(stats, attribute)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"The statistics {stats.path or 'B'} and {other} differ in "
                             f"{attribute} ({theirs} vs {mine}): they are not comparable; "
                             "recompute one of them with the same weights and protocol.")


def compare(a: statistics.Stats, b: statistics.Stats, *, logits_a: np.ndarray | None = None,
            kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
            seed: int = 0) -> dict[str, float]:
    """Scores of set a against set b: fid; inception_score(_std) of a when logits_a is
    given (over IS_SPLITS splits, or one per image below that); kid(_std), precision,
    recall, density, coverage when both hold features. Warns when a covariance is
    singular (statistics.warn_if_rank_deficient)."""
    _check_comparable(b, a.weights_hash, a.resize, a.path or "A")
    for stats, name in ((a, "A"), (b, "B")):
        if stats.num_images is not None:
            statistics.warn_if_rank_deficient(stats.num_images, stats.path or name)
    values = {"fid": scores.fid(a.mu, a.sigma, b.mu, b.sigma)}
    if logits_a is not None:
        values["inception_score"], values["inception_score_std"] = scores.inception_score(
            logits_a, min(IS_SPLITS, len(logits_a)))
    if a.features is not None and b.features is not None:
        values["kid"], values["kid_std"] = scores.kid(
            b.features, a.features, subsets=kid_subsets, subset_size=kid_subset_size,
            seed=seed)
        precision, recall = metrics.precision_recall(b.features, a.features, k=PR_K)
        density, coverage = metrics.density_coverage(b.features, a.features, k=DC_K)
        values.update(precision=float(precision), recall=float(recall),
                      density=float(density), coverage=float(coverage))
    return values


def sample_metrics(images, reference: statistics.Stats | str, network: FeatureNetwork, *,
                   value_range: tuple[float, float] | None = None,
                   feature_samples: int = FEATURE_SAMPLES, kid_subsets: int = KID_SUBSETS,
                   kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
                   label: str = "Samples") -> tuple[dict[str, float], dict]:
    """Scores of generated images against reference statistics (a Stats or a stats file
    path, checked against the network's weights): (metrics, protocol).

    images: uint8 [N, H, W, C] (C = 1 or 3), or floats in value_range (preprocess.to_pixels).
    metrics: fid; inception_score(_std) when the weights have logits; kid(_std),
    precision, recall (k = 3), density, coverage (k = 5) when the reference holds features
    (computed on the first feature_samples of each side). protocol: num_images,
    reference_images, feature_samples, weights_hash, weights_source, resize, stats_file.
    """
    if isinstance(reference, str):
        reference = statistics.load(reference, network.weights_hash, preprocess.RESIZE)
    _check_comparable(reference, network.weights_hash, preprocess.RESIZE, "this network")
    if reference.features is not None:
        reference = dataclasses.replace(reference, features=reference.features[:feature_samples])
    samples = network.describe(images, value_range=value_range, keep_features=feature_samples,
                               label=label)
    values = compare(samples.stats, reference, logits_a=samples.logits,
                     kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    protocol = {
        "num_images": samples.stats.num_images, "reference_images": reference.num_images,
        "feature_samples": (min(len(samples.stats.features), len(reference.features))
                            if reference.features is not None else 0),
        "weights_hash": network.weights_hash, "weights_source": network.weights.source,
        "resize": preprocess.RESIZE, "stats_file": reference.path}
    return values, protocol
