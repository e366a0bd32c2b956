"""Content checksums of array pytrees, computed where the arrays are, and the integrity
record a checkpoint keeps in its metadata (`seal` when saving, `verify` when restoring).

Each leaf gets a 64-bit checksum (16 hex digits): two 32-bit lanes, each the sum modulo
2^32 of a mixed hash of every element's bits and its position. A sum does not depend on
the order in which the parts are added, so a jitted program hashes every shard on the
device holding it and adds the per-device sums: no array travels to the host, each
process hashes only its own shards, and the result does not depend on the sharding or
the number of devices. Each element's term is a bijection of its bits, so any change of
a single element changes the checksum; larger damage goes unnoticed with probability
about 2^-64. This detects damage to stored data; it is no defence against tampering.
"""

import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

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


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """uint32 row-major index of every element (modulo 2^32), computed per shard by XLA."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(
            stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32[2]: the two lanes of one array's checksum."""
    words = _words(jnp.asarray(x))
    mixed = words ^ _fmix32(_positions(words.shape) * _GOLDEN)
    lanes = [_fmix32(mixed), _fmix32(mixed ^ _LANE_SALT)]
    return jnp.stack([jnp.sum(lane, dtype=jnp.uint32) for lane in lanes])


def _split(x: Any) -> NamedSharding | None:
    """For an array replicated over a mesh, a sharding that splits its largest dimension
    divisible by the mesh size over every device (a local slice, no communication), so
    that each device hashes a part rather than all of it; otherwise None."""
    sharding = getattr(x, "sharding", None)
    if not (isinstance(sharding, NamedSharding) and sharding.is_fully_replicated
            and sharding.mesh.size > 1
            and all(t == AxisType.Auto for t in sharding.mesh.axis_types)):
        return None
    dims = [d for d, n in enumerate(x.shape) if n % sharding.mesh.size == 0]
    if not dims:
        return None
    split = max(dims, key=lambda d: x.shape[d])
    return NamedSharding(sharding.mesh, P(*(sharding.mesh.axis_names if d == split else None
                                             for d in range(x.ndim))))


@functools.partial(jax.jit, static_argnums=1)
def _lanes(x: jax.Array, split: NamedSharding | None) -> jax.Array:
    if split is not None:
        x = jax.lax.with_sharding_constraint(x, split)
    return _leaf_checksum(x)


def tree_checksums(tree: Any) -> dict[str, str]:
    """'path.to.leaf' (orbax's flat names) -> 16 hex digits, for every array leaf.

    One small program per distinct shape, dtype and sharding (a tree-wide program takes
    XLA far longer to compile), all dispatched before any result is read. A collective
    in a multi-process job: every process calls it with its global arrays.
    """
    lanes = {name: _lanes(x, _split(x))
             for name, x in ocp.tree.to_flat_dict(tree, sep=".").items()}
    return {name: "".join(f"{int(w):08x}" for w in np.asarray(value.addressable_data(0)))
            for name, value in lanes.items()}


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
