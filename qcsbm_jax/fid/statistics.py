"""Feature statistics: streamed, exactly combinable, and the stats files that carry them.

`FeatureStats` holds float64 sums (count, sum x, sum x x^T) of the features seen so far, so
it takes features a batch at a time (never all N x 2048 at once), and the statistics of
several parts (processes, jobs, files) add up to those of the whole. Mean and covariance
(ddof = 1, as np.cov) come out at the end.

Stats file (.npz, the format pytorch-fid and TTUR read and write):
  mu            float64 [2048]
  sigma         float64 [2048, 2048]
  num_images    int64, the number of images
  weights_hash  str, SHA-256 of the Inception weights (qcsbm_jax.fid.weights.weights_hash)
  resize        str, the resize protocol (qcsbm_jax.fid.preprocess.RESIZE)
  features      float32 [M, 2048], optional: the first M images' features (KID, precision,
                recall, density and coverage need them)
Files written by other tools hold only mu and sigma; they are read, with a warning that
their weights cannot be checked.
"""

import dataclasses
import os
import tempfile
import warnings

import numpy as np

from qcsbm_jax.fid.inception import NUM_FEATURES


@dataclasses.dataclass
class FeatureStats:
    """Running float64 sums of features [*, D]: count, total [D], outer [D, D]."""
    count: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def empty(cls, dim: int = NUM_FEATURES) -> "FeatureStats":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_moments(cls, mu: np.ndarray, sigma: np.ndarray, count: int) -> "FeatureStats":
        """The sums behind a mean and covariance (ddof = 1) of `count` features."""
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        return cls(int(count), count * mu, (count - 1) * sigma + count * np.outer(mu, mu))

    def add(self, features: np.ndarray) -> None:
        """Accumulates a batch of features [B, D] (in float64)."""
        f = np.asarray(features, np.float64)
        self.count += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.count + other.count, self.total + other.total,
                            self.outer + other.outer)

    @property
    def mu(self) -> np.ndarray:
        return self.total / self.count

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance [D, D] (ddof = 1); needs count >= 2."""
        if self.count < 2:
            raise ValueError(f"A covariance needs at least 2 images; got {self.count}.")
        mu = self.mu
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (sigma + sigma.T) / 2


@dataclasses.dataclass
class Stats:
    """What a stats file holds (module doc); weights_hash None when the file has none."""
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None
    weights_hash: str | None
    resize: str | None = None
    features: np.ndarray | None = None
    path: str | None = None

    def sums(self) -> FeatureStats:
        if self.num_images is None:
            raise ValueError(f"{self.path or 'These statistics'} record no image count, so "
                             "they cannot be combined with others.")
        return FeatureStats.from_moments(self.mu, self.sigma, self.num_images)


def warn_if_rank_deficient(count: int, what: str, dim: int = NUM_FEATURES) -> None:
    """Warns that the covariance of count < dim + 1 features is singular (FID still works,
    but is biased upwards and not comparable with FID of 50,000 images)."""
    if count <= dim:
        warnings.warn(f"{what}: {count} images give a covariance of rank < {dim} (needs at "
                      f"least {dim + 1}); FID is still computed, but it is biased upwards; "
                      "compare only FIDs of equal image counts (the field uses 50,000).",
                      stacklevel=2)


def save(path: str, stats: Stats) -> None:
    """Writes a stats file (module doc) through a temporary file (never a partial file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    known = {name: value for name, value in (
        ("num_images", stats.num_images), ("weights_hash", stats.weights_hash),
        ("resize", stats.resize)) if value is not None}
    if stats.features is not None:
        known["features"] = np.asarray(stats.features, np.float32)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as f:
        np.savez(f, mu=np.asarray(stats.mu, np.float64),
                 sigma=np.asarray(stats.sigma, np.float64), **known)
    os.replace(f.name, path)


def combine(parts: list[Stats]) -> Stats:
    """The statistics of the union of disjoint image sets from theirs (exact up to float64
    rounding); all parts must share weights and resize. Features are concatenated in order
    when every part has them."""
    for attribute in ("weights_hash", "resize"):
        if len({getattr(p, attribute) for p in parts}) > 1:
            raise ValueError(f"Only statistics made alike combine; the parts differ in "
                             f"{attribute}: {[getattr(p, attribute) for p in parts]}.")
    total = sum((p.sums() for p in parts[1:]), parts[0].sums())
    have_features = all(p.features is not None for p in parts)
    return Stats(total.mu, total.sigma, total.count, parts[0].weights_hash, parts[0].resize,
                 np.concatenate([p.features for p in parts]) if have_features else None)


def load(path: str, weights_hash: str | None = None, resize: str | None = None) -> Stats:
    """Reads a stats file; raises ValueError if it was made with weights other than
    `weights_hash` or another `resize` (when both sides are known), or does not hold
    2048-dimensional statistics."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path} is not a stats file: it has no 'mu' and 'sigma' (keys: "
                             f"{f.files}); make one with `python -m qcsbm_jax.fid stats`.")
        get = {k: f[k] for k in f.files}
    stats = Stats(
        mu=np.asarray(get["mu"], np.float64), sigma=np.asarray(get["sigma"], np.float64),
        num_images=int(get["num_images"]) if "num_images" in get else None,
        weights_hash=str(get["weights_hash"]) if "weights_hash" in get else None,
        resize=str(get["resize"]) if "resize" in get else None,
        features=get.get("features"), path=path)
    dim = NUM_FEATURES
    if stats.mu.shape != (dim,) or stats.sigma.shape != (dim, dim):
        raise ValueError(f"{path} holds mu {stats.mu.shape} and sigma {stats.sigma.shape}; "
                         f"Inception pool_3 statistics are [{dim}] and [{dim}, {dim}].")
    if stats.weights_hash is None:
        warnings.warn(f"{path} does not record its Inception weights; it is used as it is "
                      "(files of pytorch-fid and TTUR use the same network).", stacklevel=2)
    elif weights_hash is not None and stats.weights_hash != weights_hash:
        raise ValueError(f"{path} was made with other Inception weights (hash "
                         f"{stats.weights_hash[:16]}..., these are {weights_hash[:16]}...); "
                         "its FID would not be comparable. Recompute it with "
                         "`python -m qcsbm_jax.fid stats` and these weights.")
    if resize is not None and stats.resize not in (None, resize):
        raise ValueError(f"{path} was made with resize {stats.resize!r}, not {resize!r}; "
                         "recompute it with `python -m qcsbm_jax.fid stats`.")
    return stats
