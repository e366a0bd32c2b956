"""PyTorch checkpoint files read without torch, never executing their code.

`torch.save` writes a pickle whose tensors point into raw storages; a TorchScript archive
(`torch.jit.save`) pickles its module tree the same way. `load` reads both formats torch
has used:

  zip (torch >= 1.6, and every TorchScript archive): PREFIX/data.pkl plus one entry
      PREFIX/data/KEY per storage, little-endian unless PREFIX/byteorder says otherwise;
  legacy (torch < 1.6): magic number, protocol, system info, the object, the list of
      storage keys, then each storage as an 8-byte element count and its raw bytes.

A restricted unpickler rebuilds only tensors (as NumPy arrays), containers (dict,
OrderedDict, list, tuple, set), strings, bytes, numbers, booleans and None. TorchScript
module objects become `ScriptObject`s holding their attributes; no code from the file is
ever run. Anything else in the pickle (a Python class, a function) is refused with
`TorchFileError`.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# torch storage class name -> NumPy dtype of its elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a readable PyTorch checkpoint, or holds more than data."""


class ScriptObject:
    """A TorchScript module (or other scripted object): its type name and attributes."""

    def __init__(self, type_name: str, attributes: dict | None = None):
        self.type_name = type_name
        self.attributes = dict(attributes or {})

    def __repr__(self) -> str:
        return f"ScriptObject({self.type_name}, {sorted(self.attributes)})"


class _StorageType:
    """Stands for a torch storage class in a persistent id: carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    """A copy of the tensor view (offset, size, stride in elements) of a flat storage."""
    del unused  # requires_grad, backward hooks, metadata
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[offset].copy()
    if min(size) == 0:
        return np.zeros(size, storage.dtype)
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if needed > storage.size:
        raise TorchFileError(f"A tensor of size {size} and stride {stride} at offset {offset} "
                             f"needs {needed} elements; its storage has {storage.size}.")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride])
    return np.array(view)


class _PendingTensor:
    """A tensor of a legacy file, whose storages follow the pickle: rebuilt at the end."""

    def __init__(self, *args):
        self.args = args


def _materialize(obj: Any) -> Any:
    """obj with every _PendingTensor inside containers and ScriptObjects rebuilt."""
    if isinstance(obj, _PendingTensor):
        return _rebuild_tensor(*obj.args)
    if isinstance(obj, ScriptObject):
        obj.attributes = _materialize(obj.attributes)
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
    return data


def _ordered_dict(*args) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


def _encode(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode as protocol-2 pickles use it for bytes; latin1 only."""
    if encoding != "latin1":
        raise TorchFileError(f"Refused _codecs.encode with encoding {encoding!r}.")
    return text.encode("latin1")


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set,
    # TorchScript's typed containers are plain lists and values.
    **{("torch.jit._pickle", f"build_{kind}list"): list
       for kind in ("int", "double", "bool", "tensor", "generic")},
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_tag: value,
    ("builtins", "frozenset"): frozenset,
}


def _script_class(name: str) -> type:
    """A data-only stand-in for the TorchScript class `name` (NEWOBJ + BUILD fill it)."""

    def new(cls, *args):
        del args
        return ScriptObject.__new__(cls)

    def setstate(self, state):
        if not isinstance(state, dict):
            raise TorchFileError(f"TorchScript object {name} has non-dict state.")
        self.type_name, self.attributes = name, dict(state)

    return type("Script_" + name.replace(".", "_"), (ScriptObject,),
                {"__new__": new, "__setstate__": setstate})


class _Unpickler(pickle.Unpickler):
    """Resolves only _SAFE_GLOBALS, torch storage types and TorchScript classes.

    load_storage(key, dtype, numel) -> flat array gives each storage once. pending: tensors
    become _PendingTensor (legacy files, whose storages are filled after the pickle).
    """

    def __init__(self, file: BinaryIO, load_storage, pending: bool = False):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage
        self._pending = pending
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol-2 name
        if (module, name) in (("torch._utils", "_rebuild_tensor"),
                              ("torch._utils", "_rebuild_tensor_v2")):
            return _PendingTensor if self._pending else _rebuild_tensor
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        raise TorchFileError(
            f"The file asks for the Python object {module}.{name}; only tensors, containers "
            "and numbers are read from PyTorch files (nothing in them is executed). Save a "
            "state dict (torch.save(model.state_dict(), path)) instead of a pickled object.")

    def persistent_load(self, pid) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise TorchFileError(f"Unknown persistent id {pid!r:.200} in the pickle.")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self.storages:
            self.storages[key] = self._load_storage(key, storage_type.dtype, numel)
        storage = self.storages[key]
        view = pid[5] if len(pid) > 5 else None  # legacy: (view key, offset, size)
        if view is not None:
            _, offset, size = view
            storage = storage[offset:offset + size]
        return storage

    def load_checked(self) -> Any:
        try:
            return self.load()
        except TorchFileError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError,
                KeyError, ValueError, struct.error) as e:
            raise TorchFileError(f"The pickle is damaged or not a PyTorch checkpoint "
                                 f"({type(e).__name__}: {e}).") from e


def _refuse_storages(key, dtype, numel):
    raise TorchFileError("A legacy torch.save header holds tensors; the file is damaged.")


def _load_zip(archive: zipfile.ZipFile, path: str) -> Any:
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchFileError(f"{path} is a zip file but not a PyTorch checkpoint "
                             f"(no PREFIX/data.pkl entry).")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = archive.read(prefix + "byteorder").decode().strip()

    def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{prefix}data/{key}"
        if name not in names:
            raise TorchFileError(f"{path} lacks the storage {name}; the file is truncated "
                                 "or damaged.")
        raw = archive.read(name)
        if len(raw) != numel * dtype.itemsize:
            raise TorchFileError(f"{path}: storage {name} holds {len(raw)} bytes, expected "
                                 f"{numel} x {dtype.itemsize}; the file is damaged.")
        array = np.frombuffer(raw, dtype.newbyteorder("<" if byteorder == "little" else ">"))
        return array.astype(dtype)

    return _Unpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load_checked()


def _load_legacy(file: BinaryIO, path: str) -> Any:
    header = [_Unpickler(file, _refuse_storages) for _ in range(2)]
    try:
        magic = header[0].load_checked()
    except TorchFileError as e:
        raise TorchFileError(f"{path} is not a PyTorch checkpoint: neither a zip archive nor "
                             f"a legacy torch.save file ({e}).") from None
    if magic != LEGACY_MAGIC:
        raise TorchFileError(f"{path} is not a PyTorch checkpoint: neither a zip archive nor "
                             "a legacy torch.save file (wrong magic number).")
    protocol = header[1].load_checked()
    if protocol != LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: unsupported legacy torch.save protocol {protocol}.")
    _Unpickler(file, _refuse_storages).load_checked()  # system information
    # Storages follow the object: hand out empty arrays, filled in place below.
    body = _Unpickler(file, lambda key, dtype, numel: np.empty(numel, dtype), pending=True)
    obj = body.load_checked()
    keys = _Unpickler(file, _refuse_storages).load_checked()
    for key in map(str, keys):
        header_bytes = file.read(8)
        if len(header_bytes) != 8 or key not in body.storages:
            raise TorchFileError(f"{path} is truncated or damaged (storage {key}).")
        (numel,) = struct.unpack("<q", header_bytes)
        target = body.storages[key]
        raw = file.read(numel * target.itemsize)
        if numel != target.size or len(raw) != target.nbytes:
            raise TorchFileError(f"{path} is truncated or damaged (storage {key} holds "
                                 f"{len(raw)} of {target.nbytes} bytes).")
        target[...] = np.frombuffer(raw, target.dtype.newbyteorder("<"))
    return _materialize(obj)


def load(path: str | os.PathLike) -> Any:
    """The object saved in a torch.save file or TorchScript archive, tensors as NumPy
    arrays (module doc). Raises FileNotFoundError or TorchFileError with the reason."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return _load_zip(archive, path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchFileError(f"{path} is a damaged zip archive ({e}).") from e
    with open(path, "rb") as file:
        return _load_legacy(file, path)


def flatten_arrays(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """'a.b.c' -> array for every array in nested dicts, lists and ScriptObjects."""
    if isinstance(obj, np.ndarray):
        return {prefix: obj}
    if isinstance(obj, ScriptObject):
        obj = obj.attributes
    if isinstance(obj, (list, tuple)):
        obj = {str(i): v for i, v in enumerate(obj)}
    if not isinstance(obj, dict):
        return {}
    flat = {}
    for key, value in obj.items():
        flat.update(flatten_arrays(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
