"""How tensor bytes get from the file to numpy: a private mmap, or pread.

`MmapStorage` maps the file copy-on-write (MAP_PRIVATE): arrays are zero-copy
and writable, and writing to them never reaches the file. Pages are read
lazily, so files larger than RAM work. `PreadStorage` reads with pread(2) into
arrays it owns, for filesystems where mmap is slow or unavailable (network
filesystems, FUSE) and for `copy=True`.
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np

from .. import errors

# MAP_NORESERVE: a private writable map is otherwise charged in full against the
# commit limit, and the kernel refuses one larger than RAM. Python does not name it.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)

# Reads are issued in pieces so that one huge tensor does not need one huge syscall.
_READ_CHUNK = 256 * 1024 * 1024


def read_exactly(fd: int, out: memoryview, offset: int, path) -> None:
    """Fill `out` with bytes of `fd` from `offset`; a short file is an error."""
    done, total = 0, len(out)
    while done < total:
        n = os.preadv(fd, [out[done:done + _READ_CHUNK]], offset + done)
        if n == 0:
            raise errors.OffsetOutOfBoundsError(
                f"file ended after {offset + done} bytes while reading {total} bytes at {offset}; "
                "was it truncated while open?", path=path)
        done += n


class PreadStorage:
    """Tensor bytes read with pread into freshly allocated arrays."""

    def __init__(self, fd: int, size: int, path) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self.bytes_read = 0  # for measuring how much a slice touched

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """An owned uint8 array of `nbytes` bytes from `offset`."""
        out = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            read_exactly(self.fd, memoryview(out), offset, self.path)
            self.bytes_read += nbytes
        return out

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.read(offset, nbytes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MmapStorage:
    """Tensor bytes as zero-copy views of a private (copy-on-write) map."""

    def __init__(self, fd: int, size: int, path) -> None:
        self.size = size
        self.path = path
        self.fd = fd
        self._map = _private_map(fd, size) if size else None
        self._buffer = np.frombuffer(self._map, dtype=np.uint8) if size else np.empty(0, np.uint8)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """A writable uint8 view of the file's bytes; writes stay private."""
        return self._buffer[offset:offset + nbytes]

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """An owned copy of the bytes (read with pread: one kernel copy, no page faults)."""
        out = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            read_exactly(self.fd, memoryview(out), offset, self.path)
        return out

    def close(self) -> None:
        # Views handed out keep the map alive; the map is released with the last of them.
        self._buffer = None
        self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _private_map(fd: int, size: int) -> mmap.mmap:
    """A copy-on-write map of the whole file: writable, and writes never reach the file."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


BACKENDS = {"mmap": MmapStorage, "pread": PreadStorage}


def open_storage(path, backend: str):
    """Open `path` with the named backend; returns the storage."""
    if backend not in BACKENDS:
        raise errors.SafeckptError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}",
                                   path=path)
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        return BACKENDS[backend](fd, size, path)
    except BaseException:
        os.close(fd)
        raise
