"""FID, Inception Score, KID, precision/recall and density/coverage of image samples, with
TF's FID Inception network in JAX (docs/fid.md; command line: python -m qcsbm_jax.fid)."""

from qcsbm_jax.fid.pipeline import (FeatureNetwork, compare, reference_statistics,
                                    sample_metrics)
from qcsbm_jax.fid.statistics import Stats, combine, load, save
from qcsbm_jax.fid.weights import Weights

__all__ = ["FeatureNetwork", "Stats", "Weights", "combine", "compare", "load",
           "reference_statistics", "sample_metrics", "save"]
