"""Content checksums: equal to a NumPy reference of the same algorithm, independent of the
sharding and the number of devices, sensitive to any change of one element."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from qcsbm_jax import checksums


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def reference(x: np.ndarray) -> str:
    """The checksum, written out in NumPy on the host (uint32 arithmetic wraps)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        words = x.astype(np.uint32)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
        words = x.view(unsigned).astype(np.uint32)
    words = words.reshape(-1)
    positions = np.arange(words.size, dtype=np.uint32)
    mixed = words ^ _fmix32(positions * np.uint32(0x9E3779B9))
    lanes = [_fmix32(mixed), _fmix32(mixed ^ np.uint32(0x5BD1E995))]
    return "".join(f"{int(lane.sum(dtype=np.uint32)):08x}" for lane in lanes)


def tree():
    key = jax.random.key(0)
    return {"kernel": jax.random.normal(key, (64, 24)),
            "bias": jnp.arange(-3.0, 5.0, dtype=jnp.bfloat16),
            "count": jnp.array(7, jnp.int32), "key": jax.random.key_data(key),
            "mask": jnp.array([True, False, True]), "empty": jnp.zeros((0, 3))}


def test_checksums_match_an_independent_numpy_reference():
    sums = checksums.tree_checksums(tree())
    assert sums == {name: reference(np.asarray(x)) for name, x in tree().items()}
    assert len(set(sums.values())) == len(sums)


@pytest.mark.parametrize("shape,spec", [((8,), P()), ((8,), P("data")),
                                        ((4, 2), P(None, "model")), ((4, 2), P("data"))])
def test_sharding_and_device_count_do_not_change_a_checksum(shape, spec):
    mesh = jax.make_mesh(shape, ("data", "model")[:len(shape)],
                         axis_types=(AxisType.Auto,) * len(shape))
    x = tree()["kernel"]
    placed = jax.device_put(x, NamedSharding(mesh, spec))
    assert checksums.tree_checksums({"w": placed}) == {"w": reference(np.asarray(x))}


def test_any_change_of_one_element_or_of_the_order_changes_the_checksum():
    x = np.asarray(tree()["kernel"])
    original = checksums.tree_checksums({"w": x})["w"]
    for changed in (np.nextafter(x[3, 5], np.inf), -x[3, 5], 0.0):
        y = x.copy()
        y[3, 5] = changed
        assert checksums.tree_checksums({"w": y})["w"] != original
    assert checksums.tree_checksums({"w": x[::-1]})["w"] != original
    assert checksums.tree_checksums({"w": x.reshape(24, 64)})["w"] == original  # bits only


def test_seal_and_verify_round_trip_and_name_what_differs():
    metadata = {"config": {"lr": 1e-3, "widths": (64, 128)}}
    sealed = checksums.seal(metadata, tree())
    assert sealed["config"] == {"lr": 1e-3, "widths": [64, 128]}  # As JSON gives it back.
    assert checksums.verify(dict(sealed), tree(), "STEP") is None
    damaged = dict(tree(), bias=tree()["bias"].at[0].set(9))
    problem = checksums.verify(dict(sealed), damaged, "STEP")
    assert problem.startswith("1 of its 6 arrays (bias) differ from the checksums")
    assert "STEP/state" in problem
