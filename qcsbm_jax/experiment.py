"""Turns a config into the pieces every mode needs: SDE, score function, initial parameters."""

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from qcsbm_jax import models, score, sde as sde_lib
from qcsbm_jax.data import images
from qcsbm_jax.data.toy import TOY_DATASETS


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


def data_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The shape of one example: (2,) for toy data, (H, W, C) for images."""
    if config.data.name in TOY_DATASETS:
        return (2,)
    if config.data.name in images.IMAGE_DATASETS:
        return images.image_shape(config.data.name)
    raise ValueError(f"Unknown data.name {config.data.name!r}; valid: "
                     f"{TOY_DATASETS + images.IMAGE_DATASETS}.")


def build_score_model(config: ml_collections.ConfigDict) -> ScoreModel:
    shape = data_shape(config)
    sde = sde_lib.get_sde(config.sde)
    network = models.build_model(config, shape, jax.random.key(config.seed))
    apply_fn, params = models.functional(network)
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
