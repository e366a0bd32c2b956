"""Device mesh, shardings and global batches: one code path from one CPU to a pod.

Processes (started by qcsbm_jax.distributed) all run the same program; collectives
cross processes.

Mesh. ('data', 'model') over all devices of all processes. The batch is split over both
axes, so every device holds B / D rows. The 'model' axis (size 1 unless
config.parallel.model_axis > 1) also shards parameters and optimizer state, FSDP-style:
each array is split along its largest dimension divisible by the axis size and jit
gathers it where it is used. Every process feeds its own contiguous slice of a global
batch (`global_batch`); slices in process order are the one-process batch, so results do
not depend on the number of devices or processes. Batch-local computations with
data-dependent loops (adaptive ODE solves) run per shard through `per_shard`, so no
collective ever sits inside a while loop.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
BATCH = P((DATA, MODEL))  # The leading (batch) axis split over every device.


def make_mesh(data_axis: int = -1, model_axis: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over all devices; data_axis=-1 takes what model_axis leaves."""
    devices = list(devices if devices is not None else jax.devices())
    if data_axis == -1:
        data_axis = len(devices) // model_axis
    if data_axis * model_axis != len(devices):
        raise ValueError(
            f"Mesh {data_axis} (data) x {model_axis} (model) does not match the "
            f"{len(devices)} available devices; set --config.parallel.data_axis and "
            "--config.parallel.model_axis so that their product is the device count.")
    return jax.make_mesh((data_axis, model_axis), (DATA, MODEL),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh, the rest replicated."""
    return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], model_size: int) -> P:
    """Shards the largest dimension divisible by model_size over 'model' (the first of
    equal ones); replicated if model_size is 1 or no dimension divides."""
    dims = [d for d, n in enumerate(shape) if model_size > 1 and n % model_size == 0]
    if not dims:
        return P()
    dim = max(dims, key=lambda d: (shape[d], -d))
    return P(*(MODEL if d == dim else None for d in range(len(shape))))


def state_sharding(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (parameters, optimizer
    state, a whole train state): FSDP over 'model' (fsdp_spec), replicated over 'data'."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape[MODEL])),
                        tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raises a clear error unless the batch is positive and splits evenly over devices
    and processes."""
    if (global_batch_size < 1 or global_batch_size % mesh.size
            or global_batch_size % jax.process_count()):
        raise ValueError(
            f"The {what} {global_batch_size} must be positive and divisible by the "
            f"{mesh.size} devices and the {jax.process_count()} processes; change it in "
            "the config.")


def bucket_size(count: int, batch_size: int, mesh: Mesh) -> int:
    """The chunk for count examples: batch_size, or for fewer examples the smallest
    power-of-two multiple of the device count that holds them, so that one compiled
    program serves every count of a bucket (and small counts are not padded to a large
    configured batch)."""
    per_device = max(1, -(-count // mesh.size))
    return min(batch_size, (1 << (per_device - 1).bit_length()) * mesh.size)


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assembles per-process slices [B / P, ...] into one global array [B, ...] on the mesh."""
    return jax.make_array_from_process_local_data(data_sharding(mesh), np.asarray(local_batch))


def per_shard(fn: Callable, mesh: Mesh, num_replicated: int, num_batched: int) -> Callable:
    """Runs a batch-local, deterministic `fn(*replicated, *batched)` on each shard alone.

    The first `num_replicated` arguments (parameters; gathered if FSDP-sharded) are
    replicated; the next `num_batched` arrays are split along their leading axis over
    every device, and so are all outputs. Draw randomness (prior samples, probes)
    outside, as global arrays: then results are the same for any number of devices.
    """
    in_specs = (P(),) * num_replicated + (BATCH,) * num_batched
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=BATCH, check_vma=False)


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array as a NumPy array."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def map_batches(fn: Callable, arrays: tuple[np.ndarray, ...], batch_size: int,
                mesh: Mesh, label: str | None = None):
    """Applies a batch-local `fn(*global_batches)` to host arrays [N, ...] in chunks.

    Every example is covered: the last chunk is padded by repeating its final row and the
    padded results are dropped. All processes must hold the same `arrays`; each feeds its
    own slice of every chunk. Returns fn's pytree of per-example outputs, [N, ...] each,
    on every process. With a label, logs a progress line per chunk.
    """
    check_batch_size(batch_size, mesh, "evaluation batch size")
    total = len(arrays[0])
    per_process = batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    outputs = []
    for start in range(0, total, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        valid = len(chunk[0])
        padded = [np.concatenate([c, np.repeat(c[-1:], batch_size - valid, axis=0)])
                  for c in chunk]
        result = fn(*(global_batch(p[rows], mesh) for p in padded))
        outputs.append(jax.tree.map(lambda r: to_host(r)[:valid], result))
        if label:
            logging.info("%s: %d/%d examples", label, start + valid, total)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
