"""Reads ``torch.save`` checkpoints (.pt/.pth/.bin) without torch and without running their pickles.

A checkpoint is a pickle, and unpickling normally calls whatever the file names: a downloaded
``.pt`` can run any code. Here the unpickler resolves only an allow-list of globals, each replaced
by an inert stand-in:

* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter``: they build a
  ``TensorRef`` (storage, offset, shape, stride) that is read into numpy only when asked for;
* the storage types ``torch.FloatStorage``, ``HalfStorage``, ``BFloat16Storage``,
  ``DoubleStorage``, ``LongStorage``, ``IntStorage``, ``ShortStorage``, ``CharStorage``,
  ``ByteStorage``, ``BoolStorage``: dtypes;
* ``collections.OrderedDict``: the container of every ``state_dict()``;
* ``argparse.Namespace``: the official training scripts save their command line as ``args`` next
  to ``model`` and ``ema``; it becomes a ``PickledNamespace`` holding the attributes as plain data.

Any other global (``posix.system``, ``builtins.eval``, a model class, ...) is refused before it is
looked up, so nothing from the file runs. Plain data (dicts, lists, tuples, numbers, strings) needs
no global, so optimizer state loads too. Both torch formats are read: the zip archive of
torch >= 1.6 (``<name>/data.pkl`` plus one file per storage under ``<name>/data/``) and the older
single stream (pickles followed by the raw storages). TorchScript archives and the pre-0.4 tar
format are refused with what to do instead.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import tarfile
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

from detailflow_jax.convert.errors import ConversionError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save stream
_LEGACY_PROTOCOL = 1001
_RESAVE = "re-save it with torch>=1.6: torch.save(torch.load(f), out)"


def _refuse_setstate(self, state):
    # A pickle's BUILD opcode calls __setstate__; without this one, dataclass(frozen=True,
    # slots=True) supplies one that rewrites the fields, and the allow-listed objects are shared
    # by every load in the process.
    raise pickle.UnpicklingError(f"{type(self).__name__} cannot be modified by the pickle")


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: np.dtype
    __setstate__ = _refuse_setstate


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0  # elements into the stored buffer (legacy storage views)
    __setstate__ = _refuse_setstate


@dataclasses.dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor of the checkpoint; its values are read only by ``PtCheckpoint.array`` (so the
    optimizer state beside the weights is never read)."""
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    __setstate__ = _refuse_setstate


class _Sealed(type):
    def __setattr__(cls, name, value):
        raise AttributeError(f"{cls.__name__} is read-only")


class PickledNamespace(metaclass=_Sealed):
    """Inert stand-in for ``argparse.Namespace``: the saved attributes as data, no code run."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError("argparse.Namespace state is not a dict of names")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"PickledNamespace({fields})"


def _int_tuple(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) for v in values):
        raise pickle.UnpicklingError(f"tensor {what} {values!r} is not a tuple of ints")
    return tuple(values)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    # requires_grad, backward hooks and metadata do not change the values.
    if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
        raise pickle.UnpicklingError("a tensor is rebuilt from something that is not a storage")
    return TensorRef(storage, storage_offset, _int_tuple(size, "size"),
                     _int_tuple(stride, "stride"))


def _rebuild_parameter(data, *_unused):
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError("a parameter wraps something that is not a tensor")
    return data


@dataclasses.dataclass(frozen=True, slots=True)
class _Rebuild:
    """A rebuild function as the unpickler hands it out: callable, but with no attributes to set."""
    fn: Callable
    __setstate__ = _refuse_setstate

    def __call__(self, *args):
        return self.fn(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Rebuild(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Rebuild(_rebuild_parameter),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): PickledNamespace,
    **{("torch", name): _StorageType(name, np.dtype(dtype))
       for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED_GLOBALS``; storages come from ``make_storage(persistent id)``."""

    def __init__(self, file, path: str, make_storage: Callable[[tuple], _Storage]):
        super().__init__(file, encoding="utf-8")  # as torch.load: Python 2 str keys -> str
        self._path = path
        self._make_storage = make_storage

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ConversionError(
                f"refusing to load '{module}.{name}' from {self._path}: a checkpoint may only "
                "contain tensors (and plain data beside them)") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        return self._make_storage(pid)


def _storage_from(pid: tuple, expected_len: int) -> _Storage:
    """('storage', storage type, key, location, numel[, view metadata]) -> _Storage."""
    if (len(pid) != expected_len or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[4], int)):
        raise pickle.UnpicklingError(f"malformed storage id {str(pid)[:80]}")
    return _Storage(str(pid[2]), pid[1].dtype, pid[4])


class PtCheckpoint:
    """An open checkpoint: ``tree`` is its contents, each tensor a ``TensorRef`` that
    ``array(ref)`` reads."""

    def __init__(self, path: str, tree: Any, read_bytes: Callable[[str], bytes],
                 little_endian: bool, close: Callable[[], None]):
        self.path, self.tree = path, tree
        self._read_bytes, self._little_endian, self._close = read_bytes, little_endian, close

    def __enter__(self) -> "PtCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def array(self, ref: TensorRef) -> np.ndarray:
        """The tensor as a fresh C-ordered numpy array (native byte order; bfloat16 as
        ``ml_dtypes.bfloat16``)."""
        storage = ref.storage
        itemsize = storage.dtype.itemsize
        raw = self._read_bytes(storage.key)
        if len(raw) < (storage.offset + storage.numel) * itemsize:
            raise ConversionError(
                f"{self.path}: storage {storage.key!r} holds {len(raw)} bytes, fewer than its "
                f"{storage.numel} elements need; the file is damaged, download it again")
        order = "<" if self._little_endian else ">"
        words = np.frombuffer(raw, np.dtype(f"u{itemsize}").newbyteorder(order),
                              count=storage.numel, offset=storage.offset * itemsize)
        flat = words.astype(f"=u{itemsize}", copy=False).view(storage.dtype)
        layout = f"tensor with shape {ref.shape}, stride {ref.stride}, offset {ref.offset}"
        if len(ref.shape) != len(ref.stride) or min(ref.shape + ref.stride + (ref.offset,)) < 0:
            raise ConversionError(f"{self.path}: {layout} is malformed")
        if 0 in ref.shape:
            return np.zeros(ref.shape, storage.dtype)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        if last >= storage.numel:
            raise ConversionError(f"{self.path}: {layout} reaches past its storage of "
                                  f"{storage.numel} elements")
        view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape,
                                               [s * itemsize for s in ref.stride])
        return np.array(view, order="C")  # a copy: nothing keeps the file's buffer alive

    def materialize(self, tree: Any) -> Any:
        """``tree`` with every TensorRef inside dicts, lists and tuples replaced by its array."""
        if isinstance(tree, TensorRef):
            return self.array(tree)
        if isinstance(tree, dict):
            return type(tree)((k, self.materialize(v)) for k, v in tree.items())
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.materialize(v) for v in tree)
        return tree


def open_pt(path: str | os.PathLike) -> PtCheckpoint:
    """Opens a torch checkpoint (use as a context manager); anything unreadable raises
    ConversionError."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        return _open_zip(path)
    if head.startswith(b"PK"):
        raise ConversionError(f"{path} is truncated or corrupt (a zip archive without its "
                              "directory); download it again")
    if head.startswith(b"\x80"):
        return _open_legacy(path)
    if len(head) < 4:
        raise ConversionError(f"{path} is empty or truncated ({len(head)} bytes); "
                              "download it again")
    if tarfile.is_tarfile(path):
        raise ConversionError(f"{path} is in the tar format of torch < 0.4, which is not read "
                              f"here; {_RESAVE}")
    raise ConversionError(f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor "
                          "a legacy torch pickle); pass a file written by torch.save, or a .npz / "
                          ".safetensors")


def load_pt(path: str | os.PathLike) -> Any:
    """The whole checkpoint with every tensor read into a numpy array."""
    with open_pt(path) as ckpt:
        return ckpt.materialize(ckpt.tree)


def _unpickle(file, path: str, make_storage: Callable[[tuple], _Storage]) -> Any:
    try:
        return _RestrictedUnpickler(file, path, make_storage).load()
    except ConversionError:
        raise
    except Exception as e:  # any failure of the unpickler means the same: a damaged file
        raise ConversionError(f"{path}: its pickle is corrupt or not a torch checkpoint "
                              f"({type(e).__name__}: {e}); download it again") from None


def _open_zip(path: str) -> PtCheckpoint:
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise ConversionError(f"{path} is a TorchScript archive (torch.jit.save); save "
                                      "model.state_dict() with torch.save instead")
            raise ConversionError(f"{path} is not a torch checkpoint (no data.pkl inside)")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = (archive.read(prefix + "byteorder").decode().strip()
                     if prefix + "byteorder" in names else "little")
        tree = _unpickle(io.BytesIO(archive.read(pickles[0])), path,
                         lambda pid: _storage_from(pid, 5))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ConversionError(f"{path} is truncated or corrupt ({e}); download it again") from None

    def read_bytes(key: str) -> bytes:
        member = f"{prefix}data/{key}"
        try:
            return archive.read(member)
        except KeyError:
            raise ConversionError(f"{path}: storage {member!r} is missing; the file is incomplete, "
                                  "download it again") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConversionError(f"{path}: storage {member!r} is corrupt ({e}); "
                                  "download it again") from None

    return PtCheckpoint(path, tree, read_bytes, byteorder == "little", archive.close)


def _open_legacy(path: str) -> PtCheckpoint:
    """torch < 1.6: magic, protocol and sys-info pickles, the data pickle, the list of storage
    keys, then each storage as a little-endian int64 element count and its raw bytes."""
    f = open(path, "rb")
    try:
        return _read_legacy(f, path)
    except BaseException:
        f.close()
        raise


def _read_legacy(f, path: str) -> PtCheckpoint:
    storages: dict[str, _Storage] = {}

    def make_storage(pid: tuple) -> _Storage:
        root = storages.setdefault(str(pid[2]), _storage_from(pid, 6))
        view = pid[5]
        if view is None:
            return root
        _, offset, size = view  # (view key, element offset, element count): a slice
        return dataclasses.replace(root, numel=size, offset=root.offset + offset)

    no_storage = _no_storages(path)
    magic = _unpickle(f, path, no_storage)
    protocol, sys_info = None, None
    if magic == _LEGACY_MAGIC:
        protocol, sys_info = _unpickle(f, path, no_storage), _unpickle(f, path, no_storage)
    if protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
        raise ConversionError(f"{path} is a pickle but not a torch checkpoint that this reader "
                              f"knows; {_RESAVE}")
    tree = _unpickle(f, path, make_storage)
    keys = _unpickle(f, path, no_storage)
    size = os.fstat(f.fileno()).st_size
    offsets = {}
    for key in keys:
        # torch writes counts and storages little-endian whatever the machine (sys_info's
        # little_endian only describes the writer), and reads them back that way.
        count = f.read(8)
        numel = int.from_bytes(count, "little", signed=True)
        if len(count) < 8 or str(key) not in storages or numel < 0:
            raise ConversionError(f"{path} is truncated or corrupt (storage {key!r}); "
                                  "download it again")
        offsets[str(key)] = (f.tell(), numel * storages[str(key)].dtype.itemsize)
        f.seek(offsets[str(key)][1], os.SEEK_CUR)
    if f.tell() > size:
        raise ConversionError(f"{path} is truncated ({size} bytes, its storages need {f.tell()}); "
                              "download it again")

    def read_bytes(key: str) -> bytes:
        if key not in offsets:
            raise ConversionError(f"{path}: storage {key!r} is missing; the file is incomplete, "
                                  "download it again")
        f.seek(offsets[key][0])
        return f.read(offsets[key][1])

    return PtCheckpoint(path, tree, read_bytes, True, f.close)


def _no_storages(path: str) -> Callable[[tuple], _Storage]:
    def refuse(pid: tuple) -> _Storage:
        raise ConversionError(f"{path}: a storage appears outside the data pickle; "
                              "the file is corrupt")
    return refuse
