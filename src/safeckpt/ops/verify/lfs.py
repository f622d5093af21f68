"""Git LFS pointers, and the sha256 the Hub shows for an LFS file.

A Git LFS pointer (spec v1) stands in a repository for a large file: three or more
``key value`` lines, ``version`` first and the rest sorted, each ending in ``\\n``::

    version https://git-lfs.github.com/spec/v1
    oid sha256:4d7a2146…(64 hex digits)
    size 4224

The oid is the sha256 of the file's bytes (`sha256_file`): the value the Hub shows.
`Sha256Jobs` hashes several files so on a thread pool, beside verify's BLAKE3 pass.
A pointer saved where the checkpoint should be (the content was never pulled) is
named as such by `refuse_pointer`, whatever the file's name.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ... import errors
from ...format.storage import open_regular_file
from ...sources.base import mapped
from .range_hash import Meter, PageDropper

# Git LFS never reads a larger file as a pointer (its blob size cutoff).
MAX_POINTER_BYTES = 1024
LFS_VERSIONS = ("https://git-lfs.github.com/spec/v1", "https://hawser.github.com/spec/v1")
SHA256_BLOCK_BYTES = 16 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_POINTER_KEY = re.compile(r"[a-z0-9.-]+")
_POINTER_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class LfsPointer:
    """A Git LFS pointer: the sha256 (hex) and size of the file it stands for."""

    oid: str
    size: int
    path: Optional[str] = None


def parse_lfs_pointer(data: bytes, path: "os.PathLike | str | None" = None) -> LfsPointer:
    """Parse a Git LFS pointer strictly (spec v1): ``version`` first, then sorted
    ``key value`` lines with ``oid sha256:<64 hex>`` and ``size <bytes>``, each ending in a newline.

    >>> parse_lfs_pointer(b"version https://git-lfs.github.com/spec/v1\\noid sha256:" + b"0" * 64
    ...                   + b"\\nsize 12\\n").size
    12
    """
    where = os.fspath(path) if path is not None else None

    def bad(detail: str) -> errors.SafeckptError:
        return errors.SafeckptError(f"not a valid Git LFS pointer: {detail} (a pointer is three lines: "
                                    f"'version {LFS_VERSIONS[0]}', 'oid sha256:<64 hex digits>', "
                                    "'size <bytes>')", path=where)

    if len(data) > MAX_POINTER_BYTES:
        raise bad(f"it is larger than {MAX_POINTER_BYTES} bytes, and pointers are smaller (is this the file "
                  "itself?)")
    try:
        text = bytes(data).decode("ascii")
    except UnicodeDecodeError:
        raise bad("it is not ASCII text") from None
    if "\r" in text:
        raise bad("it has Windows line endings (\\r\\n); pointers use \\n")
    if not text.endswith("\n"):
        raise bad("its last line does not end with a newline" if text else "it is empty")
    lines = text[:-1].split("\n")
    version = lines[0].partition(" ")
    if version[0] != "version" or version[2] not in LFS_VERSIONS:
        raise bad(f"the first line is {lines[0][:80]!r}, not 'version {LFS_VERSIONS[0]}'")
    fields: dict[str, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        key, space, value = line.partition(" ")
        if not space or not value or not _POINTER_KEY.fullmatch(key):
            raise bad(f"line {number} is not 'key value': {line[:80]!r}")
        if key in fields:
            raise bad(f"{key!r} appears twice")
        if fields and key < list(fields)[-1]:
            raise bad(f"its keys are not in sorted order ({key!r} after {list(fields)[-1]!r})")
        if key not in ("oid", "size") and not key.startswith("ext-"):
            raise bad(f"unknown key {key!r} on line {number}")
        fields[key] = value
    oid, size = fields.get("oid"), fields.get("size")
    if oid is None or size is None:
        raise bad(f"it has no {'oid' if oid is None else 'size'} line")
    if not oid.startswith("sha256:") or not _HEX64.fullmatch(oid[len("sha256:"):]):
        raise bad(f"the oid is {oid[:80]!r}, not 'sha256:' and 64 lower-case hex digits")
    if not _POINTER_SIZE.fullmatch(size) or int(size) >= 1 << 63:
        raise bad(f"the size is {size[:40]!r}, not a number of bytes")
    return LfsPointer(oid[len("sha256:"):], int(size), where)


def read_lfs_pointer(path: "os.PathLike | str") -> LfsPointer:
    """Read and parse a Git LFS pointer file (see `parse_lfs_pointer`).

    >>> read_lfs_pointer("model.safetensors.pointer").oid[:8]
    '4d7a2146'
    """
    path = os.fspath(path)
    with open_regular_file(path) as file:
        return parse_lfs_pointer(file.read(MAX_POINTER_BYTES + 1), path)


def refuse_pointer(path: str, head: bytes) -> None:
    """A Git LFS pointer where the checkpoint should be: say so, whatever the file is named.

    `head` is the file's first bytes; WrongFormatError when they are a pointer.

    >>> refuse_pointer("model.safetensors", b"version https://git-lfs.github.com/spec/v1\\n...")
    Traceback (most recent call last):
    safeckpt.errors.WrongFormatError: model.safetensors: not the checkpoint but a Git LFS pointer to it ...
    """
    if not head.startswith(b"version https://"):
        return
    try:
        pointer = parse_lfs_pointer(head, path)
    except errors.SafeckptError:
        if not head.startswith(b"version https://git-lfs"):
            return
        found = ""
    else:
        found = f" (oid sha256:{pointer.oid[:12]}..., {pointer.size:,} bytes)"
    raise errors.WrongFormatError(
        f"not the checkpoint but a Git LFS pointer to it{found}: fetch the real content with `git lfs pull` "
        "(or download it from the Hub)", detected="git-lfs-pointer", path=path)


def sha256_file(path: "os.PathLike | str", progress: Optional[Callable[[int], None]] = None) -> str:
    """The hex sha256 of a file, streamed from its map (the oid of a Git LFS / Hub file).

    >>> sha256_file("model.safetensors")[:12]
    '4d7a21465b0e'
    """
    digest = _sha256(os.fspath(path), progress, threading.Event())
    assert digest is not None  # only a set stop event cuts it short
    return digest


def _sha256(path: str, progress: Optional[Callable[[int], None]], stop: threading.Event) -> Optional[str]:
    digest = hashlib.sha256()
    with mapped(path) as data:
        view = memoryview(data)
        dropper = PageDropper(data)
        try:
            for start in range(0, view.nbytes, SHA256_BLOCK_BYTES):
                if stop.is_set():  # the verification ended early (an error, ^C): do not finish a large file
                    return None
                block = view[start:start + SHA256_BLOCK_BYTES]
                digest.update(block)  # hashlib releases the GIL for large buffers
                dropper.drop(start + block.nbytes)
                if progress is not None:
                    progress(block.nbytes)
        finally:
            view.release()
    return digest.hexdigest()


class Sha256Jobs:
    """The sha256 of files, on a thread pool beside the BLAKE3 pass (hashlib releases the GIL).

    >>> with Sha256Jobs(["model.safetensors"], meter) as jobs:
    ...     ...  # the BLAKE3 pass
    ...     digests, failures = jobs.results()
    """

    def __init__(self, paths: Iterable[str], meter: Meter) -> None:
        self.paths = list(paths)
        self.meter = meter
        self.pool: Optional[ThreadPoolExecutor] = None
        self.futures: dict[str, Future] = {}
        self.stop = threading.Event()

    def __enter__(self) -> "Sha256Jobs":
        if self.paths:
            self.meter.expect(sum(_size(path) for path in self.paths))
            self.pool = ThreadPoolExecutor(min(len(self.paths), os.cpu_count() or 1),
                                           thread_name_prefix="safeckpt-sha256")
            self.futures = {path: self.pool.submit(_sha256, path, lambda n, p=path: self.meter.tick(n, p),
                                                   self.stop)
                            for path in self.paths}
        return self

    def results(self) -> tuple[dict[str, str], dict[str, Exception]]:
        """Each file's hex sha256, and the error of each file that could not be read."""
        digests: dict[str, str] = {}
        failures: dict[str, Exception] = {}
        for path, future in self.futures.items():
            try:
                digests[path] = future.result()
            except (OSError, errors.SafeckptError) as exc:
                failures[path] = exc
        return digests, failures

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.stop.set()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _size(path: str) -> int:
    """A file's size; 0 when it cannot be read (its job fails, and says why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


__all__ = ["LfsPointer", "parse_lfs_pointer", "read_lfs_pointer", "refuse_pointer", "sha256_file", "Sha256Jobs",
           "LFS_VERSIONS", "MAX_POINTER_BYTES"]
