"""The safetensors API for every framework: save_file, load_file, save, load, safe_open."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np

from . import errors, frameworks
from .format.dtypes import DTYPES, storage_dtype
from .format.header import collector_paused
from .format.reader import SafetensorsFile, parse_bytes_header
from .format.writer import PreparedTensor, check_metadata, prepare
from .sinks.safetensors import serialize, write_file

PathLike = Union[str, "os.PathLike[str]"]


def _located(exc: errors.SafeckptError, path, name: str) -> errors.SafeckptError:
    """A framework adapter's error, made to name the file and tensor it was about."""
    if exc.path is not None:
        return exc
    return type(exc)(exc.detail, path=path, tensor=name)


def prepare_tensors(tensors: Mapping[str, Any], path=None) -> List[PreparedTensor]:
    """Check a dict of tensors (numpy or any framework's) and describe each for writing."""
    if not isinstance(tensors, Mapping):
        raise errors.UnsupportedTensorError(
            f"expected a dict of name -> tensor, got {type(tensors).__name__}", path=path)
    prepared = []
    for name, value in tensors.items():
        try:
            array = frameworks.to_numpy(value)
        except errors.SafeckptError as exc:
            raise _located(exc, path, name) from None
        prepared.append(prepare(name, array, path))
    return prepared


def save_file(tensors: Mapping[str, Any], path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save a dict of tensors (numpy or any framework's) to a safetensors file.

    Bytes are streamed from each tensor's memory, in logical order whatever
    its strides; the file is replaced atomically.

    >>> safeckpt.save_file({"w": np.zeros((2, 3), np.float32)}, "model.safetensors", {"step": "10"})
    """
    metadata = check_metadata(metadata, path)
    write_file(prepare_tensors(tensors, path), path, metadata)


def save(tensors: Mapping[str, Any], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The safetensors bytes of a dict of tensors.

    >>> data = safeckpt.save({"w": np.ones(3, np.float32)})
    """
    metadata = check_metadata(metadata)
    return serialize(prepare_tensors(tensors), metadata)


def _read_tensor(adapter, file: SafetensorsFile, name: str, device, storage=None):
    try:
        storage = file.storage(name) if storage is None else storage
        return adapter.from_storage(storage, file.dtype(name), file.info(name).shape, device)
    except errors.SafeckptError as exc:
        raise _located(exc, file.path, name) from None


class TensorSlice:
    """A tensor not yet read; index it (numpy basic indexing) to read part of it.

    >>> with safeckpt.safe_open("model.safetensors") as f:
    ...     row = f.get_slice("embed.weight")[42]
    """

    def __init__(self, handle: "safe_open", name: str) -> None:
        self._handle, self._name = handle, name
        self._info = handle._opened().info(name)

    def get_shape(self) -> List[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return self._info.dtype

    @property
    def shape(self) -> tuple:
        return self._info.shape

    @property
    def dtype(self) -> str:
        return self._info.dtype

    def __len__(self) -> int:
        if not self._info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self._info.shape[0]

    def __getitem__(self, index):
        file = self._handle._opened()
        try:
            return self._handle._adapter.from_numpy(file.slice(self._name, index), self._handle._device)
        except errors.SafeckptError as exc:
            raise _located(exc, file.path, self._name) from None


class safe_open:
    """Open a safetensors file lazily; tensors are read (zero-copy with mmap) on request.

    `framework` accepts every name safetensors accepts ("np", "pt", "tf", "jax",
    "flax", "mlx", "paddle", ...). `backend` is "mmap" (default, zero-copy,
    private copy-on-write mapping) or "pread" (owned arrays, for filesystems
    where mmap is slow or unavailable). After the `with` block (or `close()`),
    every method and every slice taken from it raises `FileClosedError`; tensors
    already read stay valid.

    >>> with safeckpt.safe_open("model.safetensors", framework="pt") as f:
    ...     f.keys(), f.metadata(), f.get_tensor("w"), f.get_slice("w")[0:2, ::2]
    """

    def __init__(self, filename: PathLike, framework: str = "numpy", device: Any = "cpu", *,
                 backend: str = "mmap") -> None:
        self._adapter = frameworks.get(framework)
        self._device = device
        self._path = os.fspath(filename)
        self._file: Optional[SafetensorsFile] = SafetensorsFile(filename, backend=backend)

    def _opened(self) -> SafetensorsFile:
        if self._file is None:
            raise errors.FileClosedError(
                "the file is closed: use the safe_open handle (and its slices) inside its `with` block",
                path=self._path)
        return self._file

    def keys(self) -> List[str]:
        """Tensor names, sorted."""
        return sorted(self._opened().keys())

    def offset_keys(self) -> List[str]:
        """Tensor names in the order their bytes appear in the file."""
        return self._opened().keys()

    def metadata(self) -> Optional[Dict[str, str]]:
        return self._opened().metadata()

    def get_tensor(self, name: str):
        return _read_tensor(self._adapter, self._opened(), name, self._device)

    def get_tensors(self) -> Dict[str, Any]:
        """Every tensor, in file order."""
        return {name: self.get_tensor(name) for name in self.offset_keys()}

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(self, name)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _safe_open_handle(f: Any, framework: str, device: Any = "cpu", *, backend: str = "mmap") -> safe_open:
    """`safe_open` over an open binary file, as safetensors' `_safe_open_handle`: the file its name gives.

    The object needs the `name` and `fileno()` of a file opened from a path; a name
    that no longer leads to that same file (renamed, replaced) is refused.

    >>> with open("model.safetensors", "rb") as f, _safe_open_handle(f, "np") as handle:
    ...     handle.keys()
    """
    name = getattr(f, "name", None)
    if not isinstance(name, (str, bytes, os.PathLike)) or not hasattr(f, "fileno"):
        raise errors.SafeckptError(f"expected a binary file opened from a path (with .name and .fileno()), got "
                                   f"{type(f).__name__}")
    path = os.fsdecode(name)
    if not os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
        raise errors.SafeckptError("the open file is no longer the file of that name (renamed or replaced "
                                   "meanwhile): open it again", path=path)
    return safe_open(path, framework, device, backend=backend)


def load_file(path: PathLike, *, framework: str = "numpy", device: Any = "cpu", copy: bool = False,
              backend: str = "mmap") -> Dict[str, Any]:
    """Load every tensor of a safetensors file.

    By default arrays are zero-copy views of a private (copy-on-write) map of
    the file: writable, and writes never reach the file. `copy=True` reads the
    tensors into memory of their own (one allocation they share, filled by
    parallel preads), so nothing refers to the file afterwards.

    >>> tensors = safeckpt.load_file("model.safetensors", framework="pt")
    """
    adapter = frameworks.get(framework)
    with SafetensorsFile(path, backend=backend) as file, collector_paused():
        names = file.keys()
        storages = file.storages(names, copy=copy)
        return {name: _read_tensor(adapter, file, name, device, storage) for name, storage in zip(names, storages)}


def load(data: Union[bytes, bytearray, memoryview], *, framework: str = "numpy", device: Any = "cpu") -> Dict[str, Any]:
    """Load tensors from safetensors bytes; arrays own their memory.

    >>> tensors = safeckpt.load(safeckpt.save({"w": np.ones(3, np.float32)}))
    """
    adapter = frameworks.get(framework)
    header = parse_bytes_header(data)
    buffer = np.frombuffer(bytearray(data), dtype=np.uint8)  # one owned, writable copy
    result = {}
    for name, info, where in header.places():
        dtype = DTYPES[info.dtype]
        storage = buffer[where].view(storage_dtype(dtype))
        try:
            result[name] = adapter.from_storage(storage, dtype, info.shape, device)
        except errors.SafeckptError as exc:
            raise _located(exc, "<bytes>", name) from None
    return result
