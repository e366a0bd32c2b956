"""Independent random streams: every random quantity of a run has its own named stream.

A stream's key is fold_in(key(seed), TAG) with a tag of its own, so no two streams share
numbers, within a seed or across seeds (seed k's batches are not seed k + 1's data set).

  config.seed  'init'        network initialisation
               'train'       per-step times, noise, probes and dropout (fold_in of the step)
               'sample'      --mode sample and Run.sample (fold_in of the sample index)
  data.seed    'data_set'    the toy training set
               'data_order'  toy batches (fold_in of the step); image epochs and flips use
                             NumPy generators seeded with (data.seed, process, tag, ...)
  eval.seed    'test_set'    toy test points
               'eval'        per-example randomness of the metrics and evaluation samples

Per-example keys are fold_in(stream key, example index): an example's draws do not depend
on how many examples there are, on the batch it shares or on the number of devices.
"""

import jax
import jax.numpy as jnp
import numpy as np

STREAMS = {"init": 1, "train": 2, "sample": 3, "data_set": 4, "data_order": 5,
           "test_set": 6, "eval": 7}


def stream_key(seed: int, stream: str, *path: int) -> jax.Array:
    """fold_in(...fold_in(fold_in(key(seed), STREAMS[stream]), path[0])..., path[-1])."""
    if stream not in STREAMS:
        raise ValueError(f"Unknown random stream {stream!r}; valid: {sorted(STREAMS)}.")
    key = jax.random.fold_in(jax.random.key(seed), STREAMS[stream])
    for index in path:
        key = jax.random.fold_in(key, index)
    return key


def example_keys(base: jax.Array, count: int, start: int = 0) -> np.ndarray:
    """Key data [count, ...] (uint32, host) of fold_in(base, i), i = start .. start+count-1."""
    indices = jnp.arange(start, start + count, dtype=jnp.uint32)
    return np.asarray(jax.random.key_data(
        jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, indices)))
