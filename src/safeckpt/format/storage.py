"""How tensor bytes get from the file to numpy: a private mmap, or pread.

`MmapStorage` maps the file copy-on-write (MAP_PRIVATE): arrays are zero-copy
and writable, and writing to them never reaches the file. Pages are read
lazily, so files larger than RAM work. `PreadStorage` reads with pread(2) into
arrays it owns, for filesystems where mmap is slow or unavailable (network
filesystems, FUSE) and for `copy=True`.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Optional, Sequence

import numpy as np

from .. import errors

# MAP_NORESERVE: a private writable map is otherwise charged in full against the
# commit limit, and the kernel refuses one larger than RAM. Python does not name it.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)

# Reads are split into pieces of this size and spread over a few threads:
# os.preadv releases the GIL, and one thread copying from the page cache
# reaches only about half of the machine's memory bandwidth.
_READ_PIECE = 16 * 1024 * 1024
_READ_THREADS = min(8, os.cpu_count() or 1)
_pool: Optional[ThreadPoolExecutor] = None
# Arrays of a batched read start at multiples of this from the start of their shared
# buffer, which keeps each aligned for its dtype.
_ALIGN = 64


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="safeckpt-read")
    return _pool


def read_exactly(fd: int, out: memoryview, offset: int, path) -> None:
    """Fill `out` with bytes of `fd` from `offset`; a short file is an error."""
    done, total = 0, len(out)
    while done < total:
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise errors.OffsetOutOfBoundsError(
                f"file ended after {offset + done} bytes while reading {total} bytes at {offset}; "
                "was it truncated while open?", path=path)
        done += n


class _FileStorage:
    """An open file whose bytes can be copied out with pread."""

    def __init__(self, fd: int, size: int, path) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self.bytes_read = 0  # for measuring how much a slice touched

    def read_many(self, spans: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Owned uint8 arrays of the bytes at each ``(offset, nbytes)``, read in parallel.

        The arrays are aligned views of one allocation: a single large array is
        backed by transparent huge pages (about 500 page faults per GiB instead
        of about 100,000 for a few hundred separate arrays, half the time of a
        full copy). The allocation is freed with the last of them.
        """
        starts, total = [], 0
        for _, nbytes in spans:
            starts.append(total)
            total += -(-nbytes // _ALIGN) * _ALIGN
        buffer = np.empty(total, dtype=np.uint8)
        arrays = [buffer[start:start + nbytes] for start, (_, nbytes) in zip(starts, spans)]
        pieces = [(memoryview(array)[start:start + _READ_PIECE], offset + start)
                  for array, (offset, nbytes) in zip(arrays, spans)
                  for start in range(0, nbytes, _READ_PIECE)]
        if len(pieces) > 1 and _READ_THREADS > 1:
            for _ in _read_pool().map(lambda piece: read_exactly(self.fd, piece[0], piece[1], self.path), pieces):
                pass
        else:
            for out, offset in pieces:
                read_exactly(self.fd, out, offset, self.path)
        self.bytes_read += sum(nbytes for _, nbytes in spans)
        return arrays

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """An owned uint8 array of `nbytes` bytes from `offset`."""
        return self.read_many([(offset, nbytes)])[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PreadStorage(_FileStorage):
    """Tensor bytes read with pread into freshly allocated arrays."""

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.read(offset, nbytes)

    def release(self, offset: int, nbytes: int) -> None:
        """Nothing is mapped: nothing to give back."""


class MmapStorage(_FileStorage):
    """Tensor bytes as zero-copy views of a private (copy-on-write) map.

    `read`/`read_many` still copy with pread: one kernel copy, no page faults on the map.
    """

    def __init__(self, fd: int, size: int, path) -> None:
        super().__init__(fd, size, path)
        self._map = _private_map(fd, size) if size else None
        self._buffer = np.frombuffer(self._map, dtype=np.uint8) if size else np.empty(0, np.uint8)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """A writable uint8 view of the file's bytes; writes stay private."""
        return self._buffer[offset:offset + nbytes]

    def release(self, offset: int, nbytes: int) -> None:
        """Drop the mapped pages wholly inside the range from this process (they are read again from
        the file if touched): a pass over a file larger than memory stays bounded. Writes made to
        them through views are dropped too."""
        start, end = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE, (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if self._map is not None and end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        # Views handed out keep the map alive; the map is released with the last of them.
        self._buffer = None
        self._map = None
        super().close()


def _private_map(fd: int, size: int) -> mmap.mmap:
    """A copy-on-write map of the whole file: writable, and writes never reach the file."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


BACKENDS = {"mmap": MmapStorage, "pread": PreadStorage}

# What a path that is not a regular file is, in messages.
SPECIAL_FILES = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                 stat.S_IFBLK: "a block device"}
# Opening a FIFO for reading waits for a writer unless non-blocking (on a regular file the
# flag changes nothing).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def check_regular(path, mode: int) -> None:
    """Raise unless `mode` (an ``st_mode``) is a regular file's: IsADirectoryError for a folder,
    NotRegularFileError for a FIFO, socket or device."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", os.fspath(path))
    what = SPECIAL_FILES.get(stat.S_IFMT(mode), "a special file")
    raise errors.NotRegularFileError(
        f"not a regular file ({what}): refused unopened, since reading it could block or never end; "
        "give the path of a checkpoint file (save a stream to a file first)", path=path)


def open_regular_file(path) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only (see `open_regular`)."""
    return os.fdopen(open_regular(path), "rb")


def open_regular(path) -> int:
    """A read-only descriptor of the regular file at `path` (close it with os.close).

    Anything else is refused before it is opened (`check_regular`), and again after
    (a path swapped for a FIFO in between is opened without blocking, then refused).
    """
    check_regular(path, os.stat(path).st_mode)
    fd = os.open(os.fspath(path), _OPEN_FLAGS)
    try:
        check_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_storage(path, backend: str):
    """Open `path` with the named backend; returns the storage."""
    if backend not in BACKENDS:
        raise errors.SafeckptError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}",
                                   path=path)
    fd = open_regular(path)
    try:
        return BACKENDS[backend](fd, os.fstat(fd).st_size, path)
    except BaseException:
        os.close(fd)
        raise
