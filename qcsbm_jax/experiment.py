"""Turns a config into the pieces every mode needs: SDE, score function, initial parameters."""

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from qcsbm_jax import data, models, score, sde as sde_lib, streams


@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """A score model in functional form.

    score_fn(params, x [B, *data_shape], t [B], key) -> [B, *data_shape]; init_params are
    host (NumPy) arrays, identical on every process for a given seed.
    """
    sde: Any
    score_fn: score.ScoreFn
    init_params: Any
    data_shape: tuple[int, ...]


def build_score_model(config: ml_collections.ConfigDict,
                      compute_dtype: str = "float32") -> ScoreModel:
    """The SDE, score function and initial parameters (the 'init' stream of config.seed).

    compute_dtype: the network's (models.functional); training passes
    config.training.compute_dtype, evaluation and sampling run in float32."""
    shape = data.of(config).shape
    sde = sde_lib.get_sde(**config.sde)
    network = models.build_model(config.model, shape, streams.stream_key(config.seed, "init"))
    apply_fn, params = models.functional(network, compute_dtype)
    score_fn = score.make_score_fn(apply_fn, sde, config.model.family, config.model.output)
    return ScoreModel(sde, score_fn, jax.tree.map(np.asarray, params), shape)


def model_signature(config: ml_collections.ConfigDict, params: Any) -> dict:
    """What a checkpoint must match to be restored into this model. A head activation
    (toy model) changes the function without changing a shape, so it is part of it; absent
    when 'none', as in checkpoints written before the key existed."""
    shapes = {jax.tree_util.keystr(path): list(np.shape(leaf))
              for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    signature = {"model": config.model.name, "family": config.model.family,
                 "output": config.model.output, "data": config.data.name,
                 "param_shapes": shapes}
    head = config.model.get("head_activation", "none")
    return signature if head == "none" else {**signature, "head_activation": head}
