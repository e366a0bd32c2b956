"""PyTorch checkpoint files written without torch.

`save` writes the zip format (what torch.save writes by default, and torch.load reads,
also with weights_only=True) for the kinds of objects `reading.load` rebuilds: containers,
numbers, strings, None, and NumPy arrays as tensors.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from qcsbm_jax.torch_io.reading import STORAGE_DTYPES

ZIP_PREFIX = "archive/"
ZIP_ALIGNMENT = 64  # torch aligns each storage's bytes in the archive to 64 bytes.
_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in STORAGE_DTYPES.items()}


class _Pickler:
    """Protocol-2 opcodes for containers, numbers, strings, None and arrays (as tensors,
    each with its own storage, appended to `storages`); nothing else, no memo."""

    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []

    def dumps(self, obj: Any) -> bytes:
        self.out.write(pickle.PROTO + b"\x02")
        self._save(obj)
        self.out.write(pickle.STOP)
        return self.out.getvalue()

    def _write(self, *chunks: bytes) -> None:
        self.out.write(b"".join(chunks))

    def _global(self, module: str, name: str) -> None:
        self._write(pickle.GLOBAL, f"{module}\n{name}\n".encode())

    def _items(self, items, end: bytes) -> None:
        self._write(pickle.MARK)
        for item in items:
            self._save(item)
        self._write(end)

    def _save(self, obj: Any) -> None:
        if obj is None:
            self._write(pickle.NONE)
        elif isinstance(obj, (bool, np.bool_)):
            self._write(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, (int, np.integer)):
            self._int(int(obj))
        elif isinstance(obj, (float, np.floating)):
            self._write(pickle.BINFLOAT, struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            self._write(pickle.BINUNICODE, struct.pack("<I", len(data)), data)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, tuple):
            self._items(obj, pickle.TUPLE)
        elif isinstance(obj, list):
            self._write(pickle.EMPTY_LIST)
            self._items(obj, pickle.APPENDS)
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                self._global("collections", "OrderedDict")
                self._write(pickle.EMPTY_TUPLE, pickle.REDUCE)
            else:
                self._write(pickle.EMPTY_DICT)
            self._items((x for item in obj.items() for x in item), pickle.SETITEMS)
        else:
            raise TypeError(f"Cannot write {type(obj).__name__!r} objects to a PyTorch "
                            "file; only containers, numbers, strings, None and arrays.")

    def _int(self, n: int) -> None:
        if 0 <= n < 256:
            self._write(pickle.BININT1, bytes([n]))
        elif -2**31 <= n < 2**31:
            self._write(pickle.BININT, struct.pack("<i", n))
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self._write(pickle.LONG1, bytes([len(data)]), data)

    def _tensor(self, array: np.ndarray) -> None:
        """torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""
        if array.dtype not in _STORAGE_NAMES:
            raise TypeError(f"No torch storage for arrays of dtype {array.dtype}.")
        array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        key = str(len(self.storages))
        self.storages.append(array)
        strides = tuple(s // array.itemsize for s in array.strides)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self._write(pickle.MARK)
        self._write(pickle.MARK)
        self._save("storage")
        self._global("torch", _STORAGE_NAMES[array.dtype.newbyteorder("=")])
        for item in (key, "cpu", array.size):
            self._save(item)
        self._write(pickle.TUPLE, pickle.BINPERSID)
        for item in (0, tuple(array.shape), strides, False):
            self._save(item)
        self._save(collections.OrderedDict())
        self._write(pickle.TUPLE, pickle.REDUCE)


def _aligned_entry(name: str, offset: int) -> zipfile.ZipInfo:
    """A stored (uncompressed) entry whose data, its local header starting at `offset`,
    begins at a multiple of ZIP_ALIGNMENT (padding in an extra field, as torch does)."""
    info = zipfile.ZipInfo(name)
    header = 30 + len(name.encode()) + 4  # fixed local header, name, extra field header
    padding = -(offset + header) % ZIP_ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + bytes(padding)
    return info


def save(obj: Any, path: str | os.PathLike) -> None:
    """Writes obj as torch.save's zip format: nested dicts (OrderedDict stays one), lists,
    tuples, numbers, strings, None, and NumPy arrays as CPU tensors. The file appears
    complete or not at all (written beside it, then renamed)."""
    path = os.fspath(path)
    pickler = _Pickler()
    data = pickler.dumps(obj)
    partial = path + ".partial"
    try:
        with open(partial, "wb") as file, zipfile.ZipFile(file, "w") as archive:
            archive.writestr(ZIP_PREFIX + "data.pkl", data)
            archive.writestr(ZIP_PREFIX + "byteorder", "little")
            for key, array in enumerate(pickler.storages):
                entry = _aligned_entry(f"{ZIP_PREFIX}data/{key}", file.tell())
                archive.writestr(entry, array.tobytes())
            archive.writestr(ZIP_PREFIX + "version", "3\n")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
