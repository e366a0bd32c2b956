"""Content checksums of array pytrees, computed where the arrays are, and the integrity
record a checkpoint keeps in its metadata (`seal` when saving, `verify` when restoring).

Each leaf gets a 64-bit checksum (16 hex digits): two 32-bit lanes, each the sum modulo
2^32 of a mixed hash of every element's bits and its row-major position. A sum does not
depend on the order in which its parts are added, so every shard is hashed on a device
that holds it, by the one process that holds its first replica (a replicated array: by
every process, on one of its devices), and the partial sums are added on the host (across
processes: one all-gather of a few numbers per array). No array leaves its device, no
device program communicates (collectives dispatched back to back can deadlock XLA's CPU
backend), and the result does not depend on the sharding or the number of devices. Each
element's term is a bijection of its bits, so any change of a single element changes the
checksum; larger damage goes unnoticed with probability about 2^-64. This detects damage
to stored data; it is no defence against tampering.
"""

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

ALGORITHM = "fmix32-sum-2x32"  # Recorded with the checksums, so a new one can be told apart.
RECORD = "integrity"  # The metadata key of the record: algorithm, per-array checksums, digest.
_GOLDEN = np.uint32(0x9E3779B9)
_LANE_SALT = np.uint32(0x5BD1E995)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finalizer: a bijection of uint32 with good avalanche."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of x as uint32 (8-byte elements: a trailing axis of two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)


def _lanes(shard: jax.Array, starts, strides) -> jax.Array:
    """uint32[2]: both lanes' partial sums over one shard, whose words start at `starts`
    (uint32[ndim]) in an array of row-major `strides` (uint32[ndim], in words)."""
    words = _words(shard)
    index = jnp.zeros(words.shape, jnp.uint32)
    for axis in range(words.ndim):
        index = index + (jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
                         + starts[axis]) * strides[axis]
    mixed = words ^ _fmix32(index * _GOLDEN)
    return jnp.stack([jnp.sum(_fmix32(lane), dtype=jnp.uint32)
                      for lane in (mixed, mixed ^ _LANE_SALT)])


def _layout(index: tuple, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(starts, strides) in words, modulo 2^32, of the shard at `index` (slices)."""
    starts, shape = [s.start or 0 for s in index], list(shape)
    if np.dtype(dtype).itemsize == 8:  # _words adds a trailing axis of two words.
        starts, shape = starts + [0], shape + [2]
    strides = [int(np.prod(shape[axis + 1:], dtype=np.uint64)) for axis in range(len(shape))]
    as_words = lambda v: np.array([n % 2**32 for n in v], np.uint32)
    return as_words(starts), as_words(strides)


_shard_lanes = jax.jit(_lanes)


@jax.jit
def _array_lanes(x: jax.Array) -> jax.Array:
    return _lanes(x, *_layout((slice(None),) * x.ndim, x.shape, x.dtype))


def _local_partial_sums(x: Any, which: int) -> tuple[list[jax.Array], bool]:
    """(partial sums still on their devices, whether other processes add theirs).

    A replicated array: this process's copy on one of its devices (rotating with
    `which`, to spread the work), hashed whole. Otherwise one copy of every shard
    whose first replica this process holds."""
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)
    if x.sharding.is_fully_replicated:
        return [_array_lanes(x.addressable_data(which % len(x.addressable_shards)))], False
    copies = {}
    for shard in x.addressable_shards:
        copies.setdefault(str(shard.index), []).append(shard)
    sums = []
    for shards in copies.values():
        if any(shard.replica_id == 0 for shard in shards):
            shard = shards[which % len(shards)]
            sums.append(_shard_lanes(shard.data, *_layout(shard.index, x.shape, x.dtype)))
    return sums, True


def tree_checksums(tree: Any) -> dict[str, str]:
    """'path.to.leaf' (orbax's flat names) -> 16 hex digits, for every array leaf.

    Every program is dispatched before any result is read. A collective in a
    multi-process job: every process calls it with its global arrays.
    """
    flat = ocp.tree.to_flat_dict(tree, sep=".")
    partial = [_local_partial_sums(x, i) for i, x in enumerate(flat.values())]
    sums = np.zeros((len(flat), 2), np.uint64)
    for i, (parts, _) in enumerate(partial):
        for part in jax.device_get(parts):
            sums[i] = (sums[i] + part) % 2**32
    if jax.process_count() > 1:
        split = np.array([[shared] for _, shared in partial])
        everyone = np.asarray(multihost_utils.process_allgather(np.where(split, sums, 0)),
                              np.uint64).sum(0) % 2**32
        sums = np.where(split, everyone, sums)
    return {name: "".join(f"{int(w):08x}" for w in lanes) for name, lanes in zip(flat, sums)}


def json_digest(value: Any) -> str:
    """SHA-256 of the canonical JSON text of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _digest(metadata: dict, algorithm: str, array_checksums: dict[str, str]) -> str:
    return json_digest({"metadata": metadata, "algorithm": algorithm,
                        "arrays": array_checksums})


def seal(metadata: dict, tree: Any) -> dict:
    """metadata (as JSON gives it back) plus the RECORD of `tree`: the checksum of every
    array and a digest of the metadata, the algorithm and the checksums. A collective."""
    plain = json.loads(json.dumps(metadata))
    if RECORD in plain:
        raise ValueError(f"The metadata key {RECORD!r} is reserved for the checkpoint.")
    sums = tree_checksums(tree)
    return {**plain, RECORD: {"algorithm": ALGORITHM, "arrays": sums,
                              "digest": _digest(plain, ALGORITHM, sums)}}


def verify(metadata: dict, tree: Any, where: str) -> str | None:
    """What is wrong with the restored `tree` and `metadata` (whose RECORD is popped) of
    the checkpoint `where`, or None. Records of another ALGORITHM, and no record (an
    older version), are warned about as unverified. A collective."""
    record = metadata.pop(RECORD, None)
    if record is None:
        logging.warning("%s was written without content checksums (by an older version); "
                        "its arrays are not verified.", where)
        return None
    try:
        algorithm, digest = record["algorithm"], record["digest"]
        recorded = dict(record["arrays"])
    except (TypeError, KeyError, ValueError):
        return "its integrity record in metadata/metadata is garbled"
    if _digest(metadata, algorithm, recorded) != digest:
        return ("metadata/metadata differs from the digest recorded when it was saved (the "
                "file was altered)")
    if algorithm != ALGORITHM:
        logging.warning("%s holds checksums of another kind (%s, from another version); its "
                        "arrays are not verified.", where, algorithm)
        return None
    actual = tree_checksums(tree)
    bad = [name for name, value in actual.items() if recorded.get(name) != value]
    if not bad:
        return None
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (f"{len(bad)} of its {len(actual)} arrays ({shown}) differ from the checksums "
            f"recorded when it was saved (damaged data files under {where}/state)")
