"""The safetensors sink: the one writer of safetensors files, streamed and atomic.

Everything in safeckpt that writes safetensors comes here: `save_file` (`write_file`),
`save` (`serialize`), convert, cast and merge (`write_safetensors`: one file or Hugging
Face shards), and the training checkpoint (`write_stream` into a staging file object,
hashing while it writes). Each describes its output as `OutputTensor`s -- a name, dtype
and shape, and a function giving the tensor's bytes in pieces (`from_prepared` makes
one from a checked numpy array). `safeckpt.format.writer` says how a tensor becomes
bytes; this module puts them in files. `write_safetensors`:

1. plans the outputs: one file, or greedy shards in the Hugging Face layout
   (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``);
2. writes each output to a temporary sibling: the header (every shape and dtype
   is known up front, the tensors in the format's order: wider dtypes first, then
   by name), then each tensor's pieces, so memory stays near one piece whatever
   the model size; a tensor stored as-is in some file (`span`) is copied file to
   file by the kernel (copy_file_range: no page faults, no user-space copy,
   nothing left resident);
3. optionally `finish_metadata`: metadata known only at the end (a hash of the
   source computed meanwhile) replaces the header's placeholders in place -- the
   caller keeps each value's length, so the layout does not move;
4. with `verify`, re-reads each written file before it replaces anything: the
   strict reader must accept it, and every tensor's bytes must equal a second
   pass of its pieces;
5. commits every output (fsync, rename, fsync the directory), then copies the
   files that complete a model folder (`copies`: config.json, tokenizer files)
   the same way, the index last.

A failure at any point -- a bad tensor, ENOSPC, KeyboardInterrupt, a failed
verification -- removes every file of the run and leaves the files it would
have replaced untouched.

>>> t = OutputTensor("w", "F32", (2,), lambda: [np.ones(2, np.float32)])
>>> write_safetensors([t], "out.safetensors").outputs
['out.safetensors']
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from .. import errors
from ..format.atomic import atomic_output, write_all
from ..format.dtypes import DTYPES
from ..format.header import MAX_HEADER_BYTES, build_header, collector_paused
from ..format.reader import SafetensorsFile
from ..format.storage import open_regular_file
from ..format.writer import PreparedTensor, check_metadata, check_name, tensor_chunks

# Bytes handed to one write(): small enough for a smooth progress bar and bounded
# temporaries, large enough that the per-call cost is nothing.
WRITE_PIECE_BYTES = 64 * 1024 * 1024
# copy_file_range errors that mean "not here" (old kernel, filesystems it cannot join): write instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
# Bytes compared at a time by verify (each comparison makes a bool array this long).
VERIFY_PIECE_BYTES = 16 * 1024 * 1024
# Outputs are committed (renamed into place) together at the end, so a failure leaves
# every old file untouched; each holds a file descriptor until then, so past this many
# shards the written ones are committed early (descriptors are limited, often to 1024).
MAX_PENDING_OUTPUTS = 256

SAFETENSORS_SUFFIX = ".safetensors"
DEFAULT_BASE_NAME = "model"

# Units of shard sizes, as transformers' convert_file_size_to_int reads them
# ("5GB" is 5 * 10**9 bytes, "2GiB" 2 * 2**30; a lower-case "b" means bits).
_SIZE_UNITS: dict[str, int] = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

Progress = Callable[[int, int, str], None]


class OutputTensor:
    """One tensor to write and where its bytes come from.

    `chunks()` yields C-contiguous buffers (numpy arrays of any dtype, memoryviews)
    whose bytes, in order, are the tensor's little-endian C-order bytes in `dtype`;
    it is called a second time to verify. `span` is ``(path, offset)`` where the
    exact bytes already lie in a file (copied by the kernel where it can); `done`
    is called once the tensor is written (to drop the source's mapped pages).
    """

    # a plain class with slots: a file of many small tensors makes one of these per tensor
    __slots__ = ("name", "dtype", "shape", "chunks", "span", "done", "nbytes", "_rank")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], chunks: Callable[[], Iterable],
                 span: Optional[tuple[str, int]] = None, done: Optional[Callable[[], None]] = None) -> None:
        known = DTYPES[dtype]
        self.name, self.dtype, self.shape, self.chunks, self.span, self.done = name, dtype, shape, chunks, span, done
        self.nbytes = math.prod(shape) * known.bits // 8
        self._rank = known.rank

    def __repr__(self) -> str:
        return f"OutputTensor({self.name!r}, {self.dtype!r}, {tuple(self.shape)!r})"


def from_prepared(tensor: PreparedTensor) -> OutputTensor:
    """The output of a tensor `safeckpt.format.writer.prepare` checked (a numpy array or RawTensor)."""
    return OutputTensor(tensor.name, tensor.dtype.name, tensor.shape, functools.partial(_prepared_chunks, tensor.load))


def _prepared_chunks(load: Callable[[], Any]) -> Iterator[memoryview]:
    return tensor_chunks(load())


@dataclass
class SinkResult:
    """The files written: each output (in shard order), the index (sharded only), the tensor
    files' bytes, and the files copied beside them."""

    outputs: list[str]
    index: Optional[str]
    bytes_written: int
    copied: list[str] = field(default_factory=list)


def write_safetensors(tensors: Sequence[OutputTensor], dst: "os.PathLike | str", *,
                      metadata: Optional[dict[str, str]] = None, shard_size: "int | str | None" = None,
                      verify: bool = False, progress: Optional[Progress] = None,
                      finish_metadata: Optional[Callable[[dict[str, str]], dict[str, str]]] = None,
                      copies: Sequence[str] = ()) -> SinkResult:
    """Stream `tensors` into safetensors at `dst`, atomically (see the module docstring).

    `dst` is a file (``out/model.safetensors``) or a directory (``model.safetensors``
    in it; a new path without an extension is a directory). With `shard_size` (bytes,
    or "5GB", "500MB", "2GiB") and more than one shard's worth of tensors, writes
    ``model-0000k-of-0000N.safetensors`` and ``model.safetensors.index.json`` next to
    `dst`. `progress(done_bytes, total_bytes, name)` is called as bytes are written.
    `finish_metadata(metadata)`, called before the first commit, returns the final
    metadata, whose header must have the same length as the one written. `copies`
    are files copied as they are into the output folder, committed with the run.

    >>> write_safetensors(tensors, "out", shard_size="5GB").index
    'out/model.safetensors.index.json'
    """
    limit = parse_size(shard_size) if shard_size is not None else None
    metadata = check_metadata(metadata, dst) or {}
    for tensor in tensors:
        check_name(tensor.name, dst)
    run = SinkRun(list(tensors), destination(dst), limit, metadata, True, progress, verify, finish_metadata,
                  list(copies))
    run.write()
    return SinkResult(run.outputs, run.index, run.bytes_written, run.copied)


def write_file(tensors: Iterable[PreparedTensor], path: "os.PathLike | str",
               metadata: Optional[dict[str, str]] = None) -> None:
    """`save_file`: one safetensors file at exactly `path` (its folder must exist), replaced atomically.

    `metadata` is written as given (None: no ``__metadata__``), already checked.

    >>> write_file([prepare("w", np.ones(3, np.float32))], "model.safetensors")
    """
    path = os.fspath(path)
    directory, file = os.path.split(path)
    dest = Destination(directory or ".", os.path.splitext(file)[0] or DEFAULT_BASE_NAME, path)
    SinkRun([from_prepared(t) for t in tensors], dest, None, metadata, make_directories=False).write()


@dataclass
class Streamed:
    """What `write_stream` wrote: its size, and with ``hashed=True`` the BLAKE3 of each range
    (``("", 0, header_end)`` first, then each tensor's ``(name, begin, end)`` in file order) and of
    the file (`root_hash` of the ranges')."""

    size: int
    ranges: list[tuple[str, int, int]]
    range_hashes: Optional[list[str]] = None
    file_hash: Optional[str] = None


def write_stream(tensors: Sequence[OutputTensor], out: Any, metadata: Optional[dict[str, str]] = None, *,
                 hashed: bool = False, where: Optional[str] = None) -> Streamed:
    """Stream a safetensors file into a binary file object (a staging file, an fsspec file, a socket).

    The same bytes `write_file` writes; `out` needs only ``write`` (short writes are
    continued). With `hashed`, every byte is hashed once as it passes (on a helper
    thread for large pieces), range by range. `where` names the file in errors.

    >>> with open("tensors.safetensors", "wb") as out:
    ...     write_stream([from_prepared(prepare("w", np.ones(3, np.float32)))], out, hashed=True).file_hash
    """
    ordered = _ordered(tensors)
    header = _header(ordered, metadata, where)
    ranges, position = [("", 0, len(header))], len(header)
    for tensor in ordered:
        ranges.append((tensor.name, position, position + tensor.nbytes))
        position += tensor.nbytes
    if hashed:
        from ..format.integrity import HashingWriter  # at call time: blake3 is not needed to save a file
    with HashingWriter(out, ranges, whole_file=False) if hashed else contextlib.nullcontext(out) as sink:
        write = _file_object_writer(sink)
        with collector_paused():
            write(memoryview(header))
            for tensor in ordered:
                _write_pieces(write, tensor, where)
    if not hashed:
        return Streamed(position, ranges)
    return Streamed(position, ranges, sink.range_hashes(), sink.hexdigest())


def serialize(tensors: Iterable[PreparedTensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    """`save`: the whole file as bytes (metadata already checked)."""
    ordered = _ordered([from_prepared(t) for t in tensors])
    parts: list = [_header(ordered, metadata, None)]
    for tensor in ordered:
        _write_pieces(parts.append, tensor, None)
    return b"".join(parts)


def parse_size(size: "int | str") -> int:
    """Bytes in a shard size: an int, or "5GB" (10**9), "2GiB" (2**30), "500MB", "5Gb" (bits).

    Read as transformers' ``convert_file_size_to_int`` reads it.

    >>> parse_size("5GB"), parse_size("2GiB"), parse_size(1000)
    (5000000000, 2147483648, 1000)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise errors.SafeckptError(f"shard size must be a number of bytes or text like '5GB', not {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_PATTERN.match(size)
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise errors.SafeckptError(
                f"shard size {size!r} is not a size: use an integer followed by a unit, e.g. '5GB', "
                "'500MB', '2GiB'")
        bits = unit.endswith("B") and match.group(2).endswith("b") and not unit.endswith("IB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit]) // (8 if bits else 1)
    if value <= 0:
        raise errors.SafeckptError(f"shard size must be positive, got {size!r}")
    return value


# --- planning ---------------------------------------------------------------------

def shards(tensors: list[OutputTensor], limit: Optional[int]) -> list[list[OutputTensor]]:
    """Greedy packing in order; a tensor larger than the limit gets a shard of its own."""
    if limit is None:
        return [tensors]
    packed: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if packed[-1] and size + tensor.nbytes > limit:
            packed.append([])
            size = 0
        packed[-1].append(tensor)
        size += tensor.nbytes
    return packed


@dataclass(frozen=True)
class Destination:
    directory: str
    base: str  # "model" -> model-00001-of-00002.safetensors, model.safetensors.index.json
    single: str  # the path of a one-file output

    def shard(self, k: int, n: int) -> str:
        return os.path.join(self.directory, f"{self.base}-{k:05d}-of-{n:05d}{SAFETENSORS_SUFFIX}")

    @property
    def index(self) -> str:
        return os.path.join(self.directory, f"{self.base}{SAFETENSORS_SUFFIX}.index.json")


def destination(dst: "os.PathLike | str") -> Destination:
    """A directory if it is one, ends with a slash, or has no extension ("out"); else a file."""
    dst = os.fspath(dst)
    if os.path.isdir(dst) or dst.endswith(("/", os.sep)) or not os.path.splitext(os.path.basename(dst))[1]:
        return Destination(dst, DEFAULT_BASE_NAME, os.path.join(dst, DEFAULT_BASE_NAME + SAFETENSORS_SUFFIX))
    directory, file = os.path.split(dst)
    base = file[:-len(SAFETENSORS_SUFFIX)] if file.endswith(SAFETENSORS_SUFFIX) else os.path.splitext(file)[0]
    return Destination(directory or ".", base or DEFAULT_BASE_NAME, dst)


# --- writing -----------------------------------------------------------------------

@dataclass
class _Pending:
    """A written output not yet committed (its header may still change through finish_metadata)."""

    path: str
    output: atomic_output
    fd: int
    tensors: list[OutputTensor]  # in file order
    header_bytes: int


@dataclass
class SinkRun:
    """One run's outputs: written, verified, committed, or cleaned up on failure."""

    tensors: list[OutputTensor]
    dest: Destination
    limit: Optional[int]
    metadata: Optional[dict[str, str]]
    make_directories: bool = True
    progress: Optional[Progress] = None
    verify: bool = False
    finish_metadata: Optional[Callable[[dict[str, str]], dict[str, str]]] = None
    copies: list[str] = field(default_factory=list)  # files copied as they are into the output folder
    outputs: list[str] = field(default_factory=list)
    index: Optional[str] = None
    bytes_written: int = 0
    copied: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.shards = shards(self.tensors, self.limit)
        self.total = sum(t.nbytes for t in self.tensors)
        self.done = 0
        self._final_metadata: Optional[dict[str, str]] = None
        self._pending: list[_Pending] = []
        self._committed: list[str] = []
        self._made_dirs: list[str] = []
        self._span_fds: dict[str, int] = {}

    # -- the whole run
    def write(self) -> None:
        n = len(self.shards)
        paths = [self.dest.single] if n == 1 else [self.dest.shard(k + 1, n) for k in range(n)]
        try:
            if self.make_directories:
                self._make_directory()
            for path, shard in zip(paths, self.shards):
                self._write_output(path, shard)
                if len(self._pending) >= MAX_PENDING_OUTPUTS:
                    self._commit_pending()
            self._commit_pending()
            for path in self.copies:
                self._copy(path)
            if n > 1:
                self._write_index(paths)
        except BaseException:
            self.abandon()
            raise
        finally:
            for fd in self._span_fds.values():
                os.close(fd)
            self._span_fds.clear()
        self.outputs = paths
        self.bytes_written = sum(os.path.getsize(p) for p in paths)

    def _make_directory(self) -> None:
        missing, directory = [], os.path.abspath(self.dest.directory)
        while not os.path.exists(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for directory in reversed(missing):
            os.mkdir(directory)
            self._made_dirs.append(directory)

    def abandon(self) -> None:
        """Remove everything this run wrote: temporary files, committed shards, new directories."""
        for pending in self._pending:
            try:
                pending.output.__exit__(RuntimeError, RuntimeError("write failed"), None)
            except OSError:
                pass
        self._pending.clear()
        for path in self._committed:
            try:
                os.unlink(path)
            except OSError:
                pass
        for directory in reversed(self._made_dirs):
            try:
                os.rmdir(directory)
            except OSError:
                pass

    # -- one output file
    def _write_output(self, path: str, shard: list[OutputTensor]) -> None:
        ordered = _ordered(shard)
        header = _header(ordered, self.metadata, path)
        output = atomic_output(path)
        fd = output.__enter__()
        self._pending.append(_Pending(path, output, fd, ordered, len(header)))
        with collector_paused():
            write_all(fd, memoryview(header))
            for tensor in ordered:
                self._write_tensor(fd, tensor, path)

    def _write_tensor(self, fd: int, tensor: OutputTensor, path: str) -> None:
        if tensor.span is None or not self._copy_in_kernel(fd, tensor):
            _write_pieces(functools.partial(write_all, fd), tensor, path, self._advance)
        if tensor.done is not None:
            tensor.done()

    def _advance(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, name)

    def _copy_in_kernel(self, fd: int, tensor: OutputTensor) -> bool:
        """Copy a tensor's bytes file to file with copy_file_range; False where the OS cannot."""
        source_path, offset = tensor.span
        remaining = tensor.nbytes
        if not hasattr(os, "copy_file_range"):
            return False
        source_fd = self._span_fds.get(source_path)
        if source_fd is None:
            source_fd = self._span_fds[source_path] = os.open(source_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        start = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            while remaining:
                copied = os.copy_file_range(source_fd, fd, min(remaining, WRITE_PIECE_BYTES), offset)
                if copied == 0:
                    raise errors.SourceError(f"the file ended at byte {offset} inside the tensor",
                                             path=source_path, tensor=tensor.name)
                offset, remaining = offset + copied, remaining - copied
                self._advance(copied, tensor.name)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY or remaining != tensor.nbytes:
                raise
            os.lseek(fd, start, os.SEEK_SET)
            return False
        return True

    # -- committing
    def _commit_pending(self) -> None:
        """Rewrite headers with the final metadata, verify if asked, then fsync and rename."""
        metadata = self._metadata_at_commit()
        for pending in list(self._pending):
            if metadata is not self.metadata:  # finish_metadata gave the final values
                header = _header(pending.tensors, metadata, pending.path)
                if len(header) != pending.header_bytes:
                    raise AssertionError("finish_metadata changed the header's length")
                os.pwrite(pending.fd, header, 0)
            if self.verify:
                self._verify_output(pending, metadata)
            self._pending.remove(pending)
            pending.output.__exit__(None, None, None)  # fsync, rename, fsync the directory
            self._committed.append(pending.path)

    def _metadata_at_commit(self) -> dict[str, str]:
        if self.finish_metadata is None:
            return self.metadata
        if self._final_metadata is None:
            self._final_metadata = self.finish_metadata(dict(self.metadata))
        return self._final_metadata

    def _copy(self, path: str) -> None:
        target = os.path.join(self.dest.directory, os.path.basename(path))
        with open_regular_file(path) as source, atomic_output(target) as fd:
            while piece := source.read(WRITE_PIECE_BYTES):
                write_all(fd, memoryview(piece))
        self._committed.append(target)
        self.copied.append(target)

    def _write_index(self, paths: list[str]) -> None:
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {t.name: os.path.basename(path) for path, shard in zip(paths, self.shards)
                                for t in shard}}
        data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
        with atomic_output(self.dest.index) as fd:
            write_all(fd, memoryview(data))
        self._committed.append(self.dest.index)
        self.index = self.dest.index

    # -- verifying
    def _verify_output(self, pending: _Pending, metadata: dict[str, str]) -> None:
        """Re-read a written file (before it replaces anything): the strict reader must accept
        its header, and every tensor's bytes must equal a second pass of its pieces."""
        temp = pending.output.temp
        with SafetensorsFile(temp, backend="pread") as file:  # pread: only the header is read here
            header = file.header
        if header.metadata != (metadata or None) or set(header.tensors) != {t.name for t in pending.tensors}:
            raise errors.SafeckptError("verification failed: the header does not list what was written",
                                       path=pending.path)
        fd = os.open(temp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for tensor in pending.tensors:
                info = header.tensors[tensor.name]
                if (info.dtype, tuple(info.shape)) != (tensor.dtype, tuple(tensor.shape)):
                    raise errors.SafeckptError(
                        f"verification failed: written as {info.dtype}{list(info.shape)}, expected "
                        f"{tensor.dtype}{list(tensor.shape)}", path=pending.path, tensor=tensor.name)
                _verify_tensor(fd, header.data_start + info.data_offsets[0], tensor, pending.path)
                if tensor.done is not None:
                    tensor.done()
        finally:
            os.close(fd)


def _verify_tensor(fd: int, offset: int, tensor: OutputTensor, path: str) -> None:
    position = 0
    for piece in _pieces(tensor):
        expected = np.frombuffer(piece, np.uint8)
        for start in range(0, expected.size, VERIFY_PIECE_BYTES):
            want = expected[start:start + VERIFY_PIECE_BYTES]
            have = np.frombuffer(os.pread(fd, want.size, offset + position), np.uint8)
            if have.size != want.size or not np.array_equal(have, want):
                where = position + (int(np.argmax(have != want)) if have.size == want.size else have.size)
                raise errors.SafeckptError(
                    f"verification failed: byte {where} of the tensor differs from what was meant to be "
                    "written", path=path, tensor=tensor.name)
            position += want.size
    _check_length(position, tensor, path)


def _pieces(tensor: OutputTensor) -> Iterable[memoryview]:
    """The tensor's bytes as flat byte memoryviews of at most WRITE_PIECE_BYTES."""
    for chunk in tensor.chunks():
        if type(chunk) is not memoryview or chunk.format != "B" or chunk.ndim != 1:  # (the common case is not)
            if isinstance(chunk, np.ndarray):  # ml_dtypes arrays have no buffer format: see them as bytes
                chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
            chunk = memoryview(chunk)
            if chunk.format != "B" or chunk.ndim != 1:
                chunk = chunk.cast("B")
        if chunk.nbytes <= WRITE_PIECE_BYTES:
            yield chunk
        else:
            for start in range(0, chunk.nbytes, WRITE_PIECE_BYTES):
                yield chunk[start:start + WRITE_PIECE_BYTES]


def _check_length(produced: int, tensor: OutputTensor, path: str) -> None:
    if produced != tensor.nbytes:
        raise errors.SourceError(
            f"{produced} bytes were produced for a tensor of {tensor.nbytes} bytes ({tensor.dtype} "
            f"{list(tensor.shape)})", path=path, tensor=tensor.name)


def _ordered(tensors: Iterable[OutputTensor]) -> list[OutputTensor]:
    """The format's write order: dtype rank descending (wider types first, so every tensor is
    aligned), then name."""
    return sorted(tensors, key=lambda t: (-t._rank, t.name))


def _header(ordered: Sequence[OutputTensor], metadata: Optional[dict[str, str]], path: Optional[str]) -> bytes:
    header, _ = build_header([(t.name, DTYPES[t.dtype], tuple(t.shape), t.nbytes) for t in ordered], metadata)
    if len(header) - 8 > MAX_HEADER_BYTES:
        raise errors.SafeckptError(
            f"the header would be {len(header) - 8} bytes, over the format's {MAX_HEADER_BYTES}-byte limit "
            "(too many tensors or too much metadata for one file): use a smaller shard size", path=path)
    return header


def _write_pieces(write: Callable[[memoryview], Any], tensor: OutputTensor, path: Optional[str],
                  advance: Optional[Callable[[int, str], None]] = None) -> None:
    """Hand the tensor's pieces to `write`, checking that they add up to its size."""
    written = 0
    for piece in _pieces(tensor):
        write(piece)
        written += piece.nbytes
        if advance is not None:
            advance(piece.nbytes, tensor.name)
    if written != tensor.nbytes:
        _check_length(written, tensor, path)


def _file_object_writer(out: Any) -> Callable[[memoryview], None]:
    def write(view: memoryview) -> None:
        while view:
            written = out.write(view)
            view = view[view.nbytes if written is None else written:]
    return write


__all__ = ["OutputTensor", "from_prepared", "SinkResult", "write_safetensors", "write_file", "write_stream",
           "Streamed", "serialize", "parse_size", "destination", "Destination", "shards"]
