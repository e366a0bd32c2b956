"""FID, Inception Score, KID, precision/recall and density/coverage of image samples, with
TF's FID Inception network in JAX (docs/fid.md; command line: python -m qcsbm_jax.fid)."""

from qcsbm_jax.fid.pipeline import (FeatureNetwork, compare, reference_statistics,
                                    sample_metrics)
from qcsbm_jax.fid.preprocess import RESIZE
from qcsbm_jax.fid.statistics import Stats
from qcsbm_jax.fid.statistics import combine as combine_stats
from qcsbm_jax.fid.statistics import load as load_stats
from qcsbm_jax.fid.statistics import save as save_stats
from qcsbm_jax.fid.weights import Weights

__all__ = ["FeatureNetwork", "RESIZE", "Stats", "Weights", "combine_stats", "compare",
           "load_stats", "reference_statistics", "sample_metrics", "save_stats"]
