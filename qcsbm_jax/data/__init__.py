"""Data sets: one registry saying, once per data set, its kind, example shape and splits.

  kind 'toy'    2D point sets generated in JAX (data/toy.py): a training set of
                data.num_points points from the 'data_set' stream of data.seed, test points
                from the 'test_set' stream of eval.seed (qcsbm_jax.streams).
  kind 'image'  uint8 [N, 32, 32, C] splits 'train' / 'test' (data/images.py), values in the
                model's range after images.to_float.

Training batches come from `make_train_batches(config)` -> batch_at(step): this process's
slice [B / P, *shape] (float32 NumPy) of global batch number `step`. It depends only on
(config, step, process), so a resumed run sees the same batches as an uninterrupted one and
the data-iterator position is the step itself.
"""

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from qcsbm_jax import streams
from qcsbm_jax.data import images, toy


@dataclasses.dataclass(frozen=True)
class DataSet:
    """What every mode needs to know about a data set."""
    name: str
    kind: str  # 'toy' or 'image'
    shape: tuple[int, ...]  # one example: (2,) or (H, W, C)


REGISTRY = {
    **{name: DataSet(name, "toy", (2,)) for name in toy.TOY_DATASETS},
    **{name: DataSet(name, "image", images.image_shape(name)) for name in images.IMAGE_DATASETS},
}
TOY, IMAGE = "toy", "image"


def get(name: str) -> DataSet:
    """The registry entry of data set `name`; one clear error for an unknown name."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown data.name {name!r}; valid: {tuple(REGISTRY)}.")
    return REGISTRY[name]


def of(config: ml_collections.ConfigDict) -> DataSet:
    """The data set of a config (config.data.name)."""
    return get(config.data.name)


def toy_training_set(config: ml_collections.ConfigDict) -> np.ndarray:
    """The toy training set: float32 [data.num_points, 2], the same on every process."""
    return np.asarray(toy.sample_toy(config.data.name,
                                     streams.stream_key(config.data.seed, "data_set"),
                                     config.data.num_points))


def toy_test_set(config: ml_collections.ConfigDict) -> np.ndarray:
    """Fresh toy test points: float32 [eval.num_points, 2], independent of training."""
    return np.asarray(toy.sample_toy(config.data.name,
                                     streams.stream_key(config.eval.seed, "test_set"),
                                     config.eval.num_points))


def image_split(config: ml_collections.ConfigDict, split: str, process_index: int = 0,
                process_count: int = 1) -> np.ndarray:
    """This process's part of an image split, uint8 [N_p, H, W, C] (images.load_split)."""
    return images.load_split(config.data.name, split, data_dir=config.data.data_dir or None,
                             fashion_mnist_dir=config.data.fashion_mnist_dir,
                             process_index=process_index, process_count=process_count)


def make_train_batches(config: ml_collections.ConfigDict, process_index: int | None = None,
                       process_count: int | None = None) -> Callable[[int], np.ndarray]:
    """batch_at(step) -> this process's slice of global batch `step` (see module doc)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = config.training.batch_size
    if of(config).kind == TOY:
        dataset = toy_training_set(config)
        order = streams.stream_key(config.data.seed, "data_order")
        return lambda step: np.asarray(toy.toy_batch(
            dataset, order, step, batch_size, process_index, process_count))
    part = image_split(config, "train", process_index, process_count)
    return lambda step: images.train_batch(
        part, config.data.seed, step, batch_size // process_count,
        process_index=process_index, random_flip=config.data.random_flip,
        centered=config.data.centered)
