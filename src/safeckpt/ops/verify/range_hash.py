"""BLAKE3 of many byte ranges of a mapped file, on all cores, in bounded memory.

`range_digests` hashes each ``(begin, end)`` range of a buffer and yields the hex
digests in order. A large range (``BATCH_BYTES`` or more) is hashed on BLAKE3's own
threads, block by block (each block a progress step); runs of small ranges go as
batches to a thread pool (BLAKE3 releases the GIL). Mapped pages are dropped behind
the hashing (`PageDropper`), so memory stays bounded whatever the file size; `Meter`
adds up the bytes hashed, from every thread, for a progress callback.

>>> with mapped("model.safetensors") as data:
...     header, weight = range_digests(data, [(0, 128), (128, 4224)], Meter(None), "model.safetensors")
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

from ...format.integrity import new_hasher

Progress = Callable[[int, int, str], None]

# A range this large is hashed on all cores, block by block (each block a progress step);
# smaller ones go, several at a time, to a pool thread each batch.
BATCH_BYTES = 8 * 1024 * 1024
BATCH_RANGES = 1024
HASH_BLOCK_BYTES = 64 * 1024 * 1024


def range_digests(data: Any, ranges: Sequence[tuple[int, int]], meter: "Meter", name: str) -> Iterator[str]:
    """The hex BLAKE3 of each ``(begin, end)`` range of `data`, in order, on all cores.

    A large range is hashed on BLAKE3's own threads, block by block; runs of small ones
    go in batches to a thread pool (BLAKE3 releases the GIL). Mapped pages behind the
    hashing are dropped. Stopping early (closing the generator) cancels what is queued.

    >>> list(range_digests(b"abcdef", [(0, 3), (3, 6)], Meter(None), "bytes"))[0][:8]
    '6437b3ac'
    """
    view = memoryview(data) if len(data) else memoryview(b"")
    dropper = PageDropper(data)
    workers = os.cpu_count() or 1
    pending: deque[tuple[Future, int, int]] = deque()  # (batch, its bytes, its end)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="safeckpt-verify") as pool:
            try:
                for large, group in _batches(ranges):
                    if large:
                        while pending:
                            yield from _collect(pending.popleft(), meter, name, dropper)
                        yield _hash_large(view, *group[0], meter, name, dropper)
                        continue
                    nbytes = sum(end - begin for begin, end in group)
                    pending.append((pool.submit(_hash_batch, view, group), nbytes, max(e for _, e in group)))
                    while len(pending) > 2 * workers:  # a bounded look-ahead
                        yield from _collect(pending.popleft(), meter, name, dropper)
                while pending:
                    yield from _collect(pending.popleft(), meter, name, dropper)
            finally:
                for future, _, _ in pending:
                    future.cancel()
    finally:
        view.release()


def _batches(ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[bool, list[tuple[int, int]]]]:
    """(large, ranges): a large range alone, or a run of consecutive small ones."""
    group: list[tuple[int, int]] = []
    nbytes = 0
    for begin, end in ranges:
        if end - begin >= BATCH_BYTES:
            if group:
                yield False, group
                group, nbytes = [], 0
            yield True, [(begin, end)]
            continue
        group.append((begin, end))
        nbytes += end - begin
        if nbytes >= BATCH_BYTES or len(group) >= BATCH_RANGES:
            yield False, group
            group, nbytes = [], 0
    if group:
        yield False, group


def _hash_batch(view: memoryview, group: list[tuple[int, int]]) -> list[str]:
    digests = []
    for begin, end in group:
        hasher = new_hasher(0)  # one thread: the pool runs batches side by side
        hasher.update(view[begin:end])
        digests.append(hasher.hexdigest())
    return digests


def _hash_large(view: memoryview, begin: int, end: int, meter: "Meter", name: str,
                dropper: "PageDropper") -> str:
    hasher = new_hasher(end - begin)
    for start in range(begin, end, HASH_BLOCK_BYTES):
        stop = min(end, start + HASH_BLOCK_BYTES)
        hasher.update(view[start:stop])
        dropper.drop(stop)
        meter.tick(stop - start, name)
    return hasher.hexdigest()


def _collect(item: tuple[Future, int, int], meter: "Meter", name: str, dropper: "PageDropper") -> list[str]:
    future, nbytes, end = item
    digests = future.result()
    dropper.drop(end)
    meter.tick(nbytes, name)
    return digests


class PageDropper:
    """Drops a mapping's pages once hashed, in order (re-read if needed again): bounded memory.

    >>> dropper = PageDropper(mapping)
    >>> dropper.drop(64 * 1024 * 1024)  # the first 64 MiB are hashed
    """

    def __init__(self, data: Any) -> None:
        advice = getattr(mmap, "MADV_DONTNEED", None)
        self.mapping = data if isinstance(data, mmap.mmap) and advice is not None else None
        self.advice = advice
        self.done = 0

    def drop(self, end: int) -> None:
        """Drop the pages before `end` (a partial last page is kept)."""
        if self.mapping is None:
            return
        end -= end % mmap.PAGESIZE
        if end > self.done:
            with contextlib.suppress(OSError, ValueError):
                self.mapping.madvise(self.advice, self.done, end - self.done)
            self.done = end


class Meter:
    """Bytes hashed so far, for `progress(done, total, name)`; ticks come from several threads.

    >>> meter = Meter(lambda done, total, name: print(done, total, name))
    >>> meter.expect(10); meter.tick(4, "model.safetensors")
    4 10 model.safetensors
    """

    def __init__(self, progress: Optional[Progress]) -> None:
        self.progress = progress
        self.total = 0
        self.planned = False
        self.done = 0
        self.name = ""
        self.lock = threading.Lock()

    def plan(self, nbytes: int) -> None:
        """The bytes all of the work will hash, when a folder knows it up front."""
        with self.lock:
            self.total, self.planned = nbytes, True

    def expect(self, nbytes: int, extra: bool = False) -> None:
        """More bytes to hash: a file's (unless planned), or `extra` work found on the way."""
        with self.lock:
            if extra or not self.planned:
                self.total += nbytes

    def tick(self, nbytes: int, name: Optional[str] = None) -> None:
        """`nbytes` more are hashed (of the file `name`, when given)."""
        with self.lock:
            self.done += nbytes
            if name:
                self.name = name
            if self.progress is not None:
                self.progress(self.done, max(self.total, self.done), self.name)


__all__ = ["range_digests", "PageDropper", "Meter", "Progress", "BATCH_BYTES", "BATCH_RANGES", "HASH_BLOCK_BYTES"]
