"""Training data as a pure function of the step: `make_train_batches(config)` -> batch_at.

batch_at(step) returns this process's slice [B / P, *data_shape] (float32 NumPy) of global
batch number `step`; it depends only on (config, step, process), so a resumed run sees the
same batches as an uninterrupted one and the data-iterator position is the step itself.
"""

from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from qcsbm_jax.data import images, toy


def make_train_batches(config: ml_collections.ConfigDict, process_index: int | None = None,
                       process_count: int | None = None) -> Callable[[int], np.ndarray]:
    """batch_at(step) -> this process's slice of global batch `step` (see module doc)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = config.training.batch_size
    if config.data.name in toy.TOY_DATASETS:
        dataset = toy.sample_toy(config.data.name, jax.random.key(config.data.seed),
                                 config.data.num_points)
        batch_key = jax.random.key(config.data.seed + 1)
        return lambda step: np.asarray(toy.toy_batch(
            dataset, batch_key, step, batch_size, process_index, process_count))
    if config.data.name in images.IMAGE_DATASETS:
        part = images.load_split(
            config.data.name, "train", data_dir=config.data.data_dir or None,
            fashion_mnist_dir=config.data.fashion_mnist_dir, process_index=process_index,
            process_count=process_count)
        return lambda step: images.train_batch(
            part, config.data.seed, step, batch_size // process_count,
            process_index=process_index, random_flip=config.data.random_flip,
            centered=config.data.centered)
    raise ValueError(f"Unknown data.name {config.data.name!r}; valid: "
                     f"{toy.TOY_DATASETS + images.IMAGE_DATASETS}.")
