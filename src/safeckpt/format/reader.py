"""Reading safetensors files into numpy, lazily and zero-copy by default."""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import numpy as np

from .. import errors
from .dtypes import DTYPES, DType, storage_dtype
from .header import LENGTH_PREFIX, Header, HeaderEntry, check_not_other_format, parse_header, read_length_prefix
from .slicing import as_numpy_index, gather, normalize_index
from .storage import PreadStorage, open_storage, read_exactly

# Enough of the head of a file to recognise other formats in error messages.
_SNIFF_BYTES = 64


def read_header_from_fd(fd: int, file_size: int, path) -> Header:
    """Read, parse and validate the header of an open file."""
    head = np.empty(min(file_size, _SNIFF_BYTES), dtype=np.uint8)
    if len(head):
        read_exactly(fd, memoryview(head), 0, path)
    length = read_length_prefix(head.tobytes(), file_size, path)
    raw = bytearray(length)  # parsed in place: a header may be 100 MB
    read_exactly(fd, memoryview(raw), LENGTH_PREFIX, path)
    try:
        return parse_header(raw, file_size, path)
    except errors.HeaderError:
        check_not_other_format(head.tobytes(), path)
        raise


def parse_bytes_header(data: bytes, path="<bytes>") -> Header:
    """Read, parse and validate the header of a safetensors file held in memory."""
    length = read_length_prefix(bytes(data[:_SNIFF_BYTES]), len(data), path)
    try:
        return parse_header(bytes(data[LENGTH_PREFIX:LENGTH_PREFIX + length]), len(data), path)
    except errors.HeaderError:
        check_not_other_format(bytes(data[:_SNIFF_BYTES]), path)
        raise


def unpack_f4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Packed F4 bytes (first value in the low nibble) -> one float4_e2m1fn per byte."""
    values = np.empty(packed.size * 2, dtype=np.uint8)
    values[0::2] = packed & 0x0F
    values[1::2] = packed >> 4
    return values.view(DTYPES["F4"].numpy).reshape(shape)


def to_logical(storage: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """The numpy array a user sees for a tensor's stored bytes (zero-copy where possible)."""
    if dtype.name == "F4":
        return unpack_f4(storage, shape)
    if dtype.numpy is None:  # F6: no numpy type, the raw bytes
        return storage
    return storage.view(dtype.numpy).reshape(shape)


class SafetensorsFile:
    """A validated safetensors file; tensors come out as numpy arrays.

    >>> with SafetensorsFile("model.safetensors") as f:
    ...     w = f.array("lm_head.weight")
    """

    def __init__(self, path: "os.PathLike | str", *, backend: str = "mmap") -> None:
        self.path = os.fspath(path)
        self._storage = open_storage(self.path, backend)
        try:
            self.header = read_header_from_fd(self._storage.fd, self._storage.size, self.path)
        except BaseException:
            self._storage.close()
            raise

    # -- the header
    def keys(self) -> list[str]:
        """Tensor names in file (offset) order."""
        return list(self.header.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.header.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def metadata(self) -> Optional[dict[str, str]]:
        return self.header.metadata

    def info(self, name: str) -> HeaderEntry:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise errors.TensorNotFoundError(
                f"no tensor named {name!r} in the file ({len(self.header.tensors)} tensors)",
                path=self.path) from None

    def dtype(self, name: str) -> DType:
        return DTYPES[self.info(name).dtype]

    # -- the data
    def storage(self, name: str, *, copy: bool = False) -> np.ndarray:
        """The tensor's bytes as a 1-D array of its storage dtype (uint8 for packed types)."""
        return self.storages([name], copy=copy)[0]

    def storages(self, names: Sequence[str], *, copy: bool = False) -> list[np.ndarray]:
        """`storage` of several tensors; with `copy` they are read in parallel."""
        infos = [self.info(name) for name in names]
        spans = [(self.header.data_start + info.data_offsets[0], info.nbytes) for info in infos]
        raws = self._storage.read_many(spans) if copy else [self._storage.view(*span) for span in spans]
        return [raw.view(storage_dtype(DTYPES[info.dtype])) for raw, info in zip(raws, infos)]

    def array(self, name: str, *, copy: bool = False) -> np.ndarray:
        """The tensor as a numpy array: a writable zero-copy view unless `copy`."""
        info = self.info(name)
        return to_logical(self.storage(name, copy=copy), DTYPES[info.dtype], info.shape)

    def slice(self, name: str, index) -> np.ndarray:
        """``array(name)[index]`` for basic indexing, reading only the bytes needed."""
        info = self.info(name)
        dtype = DTYPES[info.dtype]
        selectors = normalize_index(index, info.shape, self.path, name)
        if dtype.numpy is None:
            raise errors.DTypeConversionError(
                f"{dtype.name} values are {dtype.bits} bits, packed across byte boundaries, and numpy has "
                "no type for them, so they cannot be sliced: read the raw bytes with get_tensor()",
                path=self.path, tensor=name)
        if dtype.packed:
            # Sub-byte values do not sit on byte boundaries: read the tensor, then index.
            return np.asarray(self.array(name, copy=True)[as_numpy_index(selectors)], order="C")
        if isinstance(self._storage, PreadStorage):
            base = self.header.data_start + info.data_offsets[0]
            return gather(self._storage.read, base, info.shape, dtype.numpy, selectors)
        view = self.array(name)[as_numpy_index(selectors)]
        if not isinstance(view, np.ndarray):  # every axis indexed by an int: a numpy scalar
            return np.asarray(view)
        return view if view.flags.c_contiguous else view.copy()

    def release(self, name: str) -> None:
        """A hint that tensor `name`'s bytes are no longer needed: its mapped pages are given back
        (arrays already handed out stay valid; their pages are read again if touched)."""
        info = self.header.tensors[name]
        self._storage.release(self.header.data_start + info.data_offsets[0], info.nbytes)

    @property
    def bytes_read(self) -> int:
        """Bytes read from the file so far by the pread backend (0 for mmap)."""
        return getattr(self._storage, "bytes_read", 0)

    def close(self) -> None:
        self._storage.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
