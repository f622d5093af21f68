"""convert: any checkpoint we read -> safetensors, streamed one tensor at a time.

The steps, in order:

1. open the source and scan every file it reads (each shard of a sharded
   checkpoint); a malicious one is refused before anything is written (unless
   `allow_unsafe_structure`; nothing in it is executed either way);
2. choose the tensors: `extract` a sub-tree (Lightning / Stable Diffusion
   ``state_dict``), swap in or drop the SD EMA weights, apply `select` /
   `exclude` globs; tied tensors (the source's aliases, or names whose arrays
   are the same bytes of the same storage) are written once, the dropped name
   recorded in metadata as ``dropped -> kept`` like ``safetensors.torch.save_model``;
3. plan the outputs: one file, or greedy shards in the Hugging Face layout
   (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``);
4. write each output through the format writer's pieces (layout, header,
   logical-order chunks, atomic temp file): each tensor is read from the
   mapped source, optionally cast in blocks, written, and its pages released,
   so memory stays near one block (one tensor at most) whatever the model size;
5. the source's sha256 is computed by a thread while this happens (hashlib
   releases the GIL); its hex digest has a fixed length, so the header is written
   with a placeholder and patched in place once the hash is known;
6. with `verify`, each written file is re-read before it replaces anything: the
   strict reader must accept it and every tensor's bytes must equal the source's
   (or its cast); then every output is committed (fsync, rename), the index last.

A failure at any point -- a bad tensor, ENOSPC, KeyboardInterrupt, a failed
verification -- removes every file of this run and leaves files it would have
replaced untouched.

Metadata written to every output: the source's own metadata (if any), then
``format: "pt"`` (transformers refuses safetensors files without it),
``safeckpt.version``, ``safeckpt.source``, ``safeckpt.source_format``,
``safeckpt.source_sha256``, ``safeckpt.extract`` / ``safeckpt.ema`` /
``safeckpt.cast`` when used, the non-tensor tree as compact JSON under
``safeckpt.tree`` (tensors in it appear as ``{"__tensor__": source name}``),
then the caller's `metadata`, then the alias entries.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import re
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .. import errors
from ..format import writer
from ..format.dtypes import DTYPES
from ..format.header import MAX_HEADER_BYTES, collector_paused
from ..format.reader import SafetensorsFile
from ..sources.base import TensorInfo, TensorSource
from . import cast as casting
from .selection import Choice, choose_tensors, first_items, tied_names

# --- limits and names --------------------------------------------------------------

# The non-tensor tree is stored in every output's header; a checkpoint with a huge
# structure (millions of optimizer scalars) must not push the header towards the
# format's 100 MB limit, so larger trees are cut (biggest parts first) and the cut noted.
MAX_TREE_JSON_BYTES = 16 * 1024 * 1024
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
# Bytes hashed between two checks for cancellation (and page drops).
HASH_BLOCK_BYTES = 8 * 1024 * 1024

HASH_KEY = "safeckpt.source_sha256"
HASH_PLACEHOLDER = "0" * 64  # a sha256 hex digest has exactly this length
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


# --- the report --------------------------------------------------------------------

@dataclass
class ConvertReport:
    """What a conversion did; `to_dict` for JSON."""

    source: str
    source_format: str
    outputs: list[str]
    index: Optional[str]
    tensors: int
    bytes_written: int
    aliases: dict[str, str]  # dropped name -> the kept name holding the same values
    skipped: list[str]  # source tensors not written (extract, ema, select/exclude)
    cast: Optional[str]
    overflow: dict[str, int]  # tensor -> finite values that overflowed in the cast
    verified: bool
    seconds: float
    scan_verdict: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- public API ----------------------------------------------------------------------

def convert(src: "os.PathLike | str | TensorSource", dst: "os.PathLike | str", *,
            shard_size: "int | str | None" = None, dtype: Optional[str] = None,
            select: "Sequence[str] | str | None" = None, exclude: "Sequence[str] | str | None" = None,
            extract: Optional[str] = "auto", ema: Optional[str] = None, verify: bool = False,
            allow_unsafe_structure: bool = False, metadata: Optional[dict[str, str]] = None,
            source_hash: bool = True,
            progress: Optional[Callable[[int, int, str], None]] = None) -> ConvertReport:
    """Convert any checkpoint safeckpt reads into safetensors, streaming; nothing is executed.

    `dst` is a file (``out/model.safetensors``) or a directory (``model.safetensors``
    in it; a new path without an extension is a directory). With `shard_size`
    (bytes, or "5GB", "500MB", "2GiB") and more than one shard's worth of tensors,
    writes ``model-0000k-of-0000N.safetensors`` files and
    ``model.safetensors.index.json`` next to `dst`. `dtype` ("bf16", "fp16", "fp32",
    "F8_E4M3", ...) casts floating tensors. `select` / `exclude` are globs on the
    output names. `extract` is "auto", a top-level key ("state_dict", "model") or
    None. `ema` is None, "drop" or "only" (Stable Diffusion ``model_ema.*``).
    `progress(done_bytes, total_bytes, name)` is called as bytes are written.

    >>> report = convert("pytorch_model.bin", "model.safetensors", dtype="bf16", verify=True)
    >>> report.tensors, report.outputs
    (291, ['model.safetensors'])
    """
    started = time.perf_counter()
    target = casting.target_dtype(dtype) if dtype is not None else None
    limit = parse_size(shard_size) if shard_size is not None else None
    select, exclude = _globs(select, "select"), _globs(exclude, "exclude")
    if ema not in (None, "drop", "only"):
        raise errors.SafeckptError(f"ema must be None, 'drop' or 'only', not {ema!r}")
    user_metadata = writer.check_metadata(metadata, dst)

    source_path = src.path if isinstance(src, TensorSource) else os.fspath(src)
    # the sha256 is the slowest part of a conversion: start it before anything else
    early_hash = _SourceHash(source_path) if source_hash and os.path.isfile(source_path) else None
    try:
        source = src if isinstance(src, TensorSource) else _open(source_path, allow_unsafe_structure)
    except BaseException:
        if early_hash is not None:
            early_hash.cancel()
        raise
    try:
        scan_report = _check_safety(_files_read(source), allow_unsafe_structure)
        choice = choose_tensors(source, extract=extract, ema=ema, select=select, exclude=exclude)
        aliases = tied_names(source, choice)
        plans = _plan_tensors(source, choice, aliases, target, dst)
        run = _Run(source, plans, _destination(dst), limit, progress, verify)
        hashed = source_hash and os.path.isfile(source.path)
        if source_hash and not hashed:
            run.notes.append(f"no source sha256: {source.path} is not a regular file")
        run.metadata = _metadata(source, choice, target, ema, user_metadata, aliases, hashed, run.notes)
        if early_hash is not None and (not hashed or source.path != source_path):
            early_hash.cancel()
            early_hash = None
        run.hasher = (early_hash or _SourceHash(source.path)) if hashed else None
        run.write()
    except BaseException:
        if early_hash is not None:
            early_hash.cancel()
        raise
    finally:
        if not isinstance(src, TensorSource):
            source.close()

    notes = list(source.notes) + choice.notes + run.notes  # what reading left out comes first
    if scan_report is not None and scan_report.verdict != "safe":
        notes.insert(0, f"the scan found the source {scan_report.verdict} ({len(scan_report.findings)} "
                        "findings); nothing in it was executed")
    if run.overflow:
        total = sum(run.overflow.values())
        warnings.warn(f"{source_path}: {total} finite values in {len(run.overflow)} tensors overflowed "
                      f"when cast to {target} (they are now ±inf, or ±max for F8_E4M3): "
                      f"{first_items(run.overflow)}", RuntimeWarning, stacklevel=2)
    return ConvertReport(
        source=source_path, source_format=source.format, outputs=run.outputs, index=run.index,
        tensors=len(plans), bytes_written=run.bytes_written, aliases=dict(aliases),
        skipped=choice.skipped, cast=target, overflow=dict(run.overflow), verified=bool(verify),
        seconds=time.perf_counter() - started,
        scan_verdict=scan_report.verdict if scan_report is not None else None, notes=notes)


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

@dataclass(frozen=True)
class _Plan:
    """One tensor to write: its output name and dtype, where its values come from."""

    name: str
    source: str
    info: TensorInfo  # of the source tensor
    dtype: str  # written dtype
    nbytes: int  # written bytes

    @property
    def cast(self) -> bool:
        return self.dtype != self.info.dtype


def _plan_tensors(source: TensorSource, choice: Choice, aliases: dict[str, str], target: Optional[str],
                  dst) -> list[_Plan]:
    plans = []
    for out, name in choice.names.items():
        if out in aliases:
            continue
        writer.check_name(out, dst)
        info = source.infos[name]
        dtype = target if target is not None and casting.is_floating(info.dtype) else info.dtype
        nbytes = info.nbytes if dtype == info.dtype else _nbytes(dtype, info.shape)
        plans.append(_Plan(out, name, info, dtype, nbytes))
    return plans


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * DTYPES[dtype].bits // 8


def _shards(plans: list[_Plan], limit: Optional[int]) -> list[list[_Plan]]:
    """Greedy packing in write order; a tensor larger than the limit gets a shard of its own."""
    if limit is None:
        return [plans]
    shards: list[list[_Plan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


@dataclass(frozen=True)
class _Destination:
    directory: str
    base: str  # "model" -> model-00001-of-00002.safetensors, model.safetensors.index.json
    single: str  # the path of a one-file output

    def shard(self, k: int, n: int) -> str:
        return os.path.join(self.directory, f"{self.base}-{k:05d}-of-{n:05d}{SAFETENSORS_SUFFIX}")

    @property
    def index(self) -> str:
        return os.path.join(self.directory, f"{self.base}{SAFETENSORS_SUFFIX}.index.json")


def _destination(dst) -> _Destination:
    """A directory if it is one, ends with a slash, or has no extension ("out"); else a file."""
    dst = os.fspath(dst)
    if os.path.isdir(dst) or dst.endswith(("/", os.sep)) or not os.path.splitext(os.path.basename(dst))[1]:
        return _Destination(dst, DEFAULT_BASE_NAME, os.path.join(dst, DEFAULT_BASE_NAME + SAFETENSORS_SUFFIX))
    directory, file = os.path.split(dst)
    base = file[:-len(SAFETENSORS_SUFFIX)] if file.endswith(SAFETENSORS_SUFFIX) else os.path.splitext(file)[0]
    return _Destination(directory or ".", base or DEFAULT_BASE_NAME, dst)


# --- metadata ----------------------------------------------------------------------

def _metadata(source: TensorSource, choice: Choice, target: Optional[str], ema: Optional[str],
              user: Optional[dict[str, str]], aliases: dict[str, str], source_hash: bool,
              notes: list[str]) -> dict[str, str]:
    import safeckpt  # at call time: the package imports this module while it initialises

    meta: dict[str, str] = dict(source.metadata or {})
    meta.setdefault("format", "pt")
    meta["safeckpt.version"] = safeckpt.__version__
    meta["safeckpt.source"] = os.path.basename(source.path.rstrip("/" + os.sep)) or source.path
    meta["safeckpt.source_format"] = source.format
    if source_hash:
        meta[HASH_KEY] = HASH_PLACEHOLDER
    else:
        meta.pop(HASH_KEY, None)
    for key, value in (("safeckpt.extract", choice.extracted), ("safeckpt.ema", ema), ("safeckpt.cast", target)):
        if value is not None:
            meta[key] = value
    tree = _tree_json(source, notes)
    if tree is not None:
        meta["safeckpt.tree"] = tree
    meta.update(user or {})
    for dropped, kept in aliases.items():
        meta.setdefault(dropped, kept)  # as save_model: user entries are never overwritten
    return meta


def _tree_json(source: TensorSource, notes: list[str]) -> Optional[str]:
    """The non-tensor structure as compact JSON, cut to MAX_TREE_JSON_BYTES."""
    tree = source.tree
    if isinstance(tree, dict) and source.metadata is not None and "__metadata__" in tree:
        tree = {k: v for k, v in tree.items() if k != "__metadata__"}  # carried over as metadata already
    if not _holds_data(tree):  # a plain state dict: nothing but tensors
        return None
    text = _compact(tree)
    if len(text) <= MAX_TREE_JSON_BYTES:
        return text
    size = len(text)
    if isinstance(tree, dict):
        parts = {k: _compact(v) for k, v in tree.items()}
        cut = dict(tree)
        for key in sorted(parts, key=lambda k: -len(parts[k])):
            cut[key] = f"<cut: {len(parts[key])} bytes of JSON>"
            text = _compact(cut)
            if len(text) <= MAX_TREE_JSON_BYTES:
                break
    if len(text) > MAX_TREE_JSON_BYTES:
        text = _compact({"__cut__": f"{size} bytes of JSON"})
    notes.append(f"the non-tensor structure is {size} bytes of JSON, over the {MAX_TREE_JSON_BYTES}-byte cap; "
                 "its largest parts were cut from safeckpt.tree")
    return text


def _holds_data(tree: Any) -> bool:
    """True if the tree has anything besides tensor references and empty containers."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return False
        return any(_holds_data(v) for v in tree.values())
    if isinstance(tree, list):
        return any(_holds_data(v) for v in tree)
    return tree is not None


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)


# --- hashing the source in the background ---------------------------------------------

class _SourceHash:
    """sha256 of the source file, computed by a thread while the outputs are written."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.digest: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safeckpt-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            digest = hashlib.sha256()
            with open(self.path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size:
                    self._hash_mapped(file.fileno(), size, digest)
            self.digest = digest.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def _hash_mapped(self, fd: int, size: int, digest) -> None:
        # Hashing the mapped file skips a copy per block (a fifth faster than read());
        # each block's pages are dropped once hashed, so the mapping adds nothing to RSS.
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        view = memoryview(mapping)
        try:
            for start in range(0, size, HASH_BLOCK_BYTES):
                if self._stop.is_set():
                    return
                digest.update(view[start:start + HASH_BLOCK_BYTES])
                mapping.madvise(mmap.MADV_DONTNEED, start, min(HASH_BLOCK_BYTES, size - start))
        finally:
            view.release()
            mapping.close()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Optional[str]:
        """The hex digest (waiting for it), or None if the file could not be hashed."""
        self._thread.join()
        return self.digest

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


# --- writing -----------------------------------------------------------------------

@dataclass
class _Pending:
    """A written output not yet committed (its header may still need the source hash)."""

    path: str
    output: writer.atomic_output
    fd: int
    ordered: list
    plans: list
    header_bytes: int
    needs_hash: bool


class _Run:
    """One conversion's outputs: written, committed, cleaned up on failure, verified."""

    def __init__(self, source: TensorSource, plans: list[_Plan], dest: _Destination, limit: Optional[int],
                 progress: Optional[Callable[[int, int, str], None]], verify: bool) -> None:
        self.source = source
        self.verify = verify
        self.plans = plans
        self.dest = dest
        self.shards = _shards(plans, limit)
        self.progress = progress
        self.total = sum(p.nbytes for p in plans)
        self.done = 0
        self.metadata: dict[str, str] = {}
        self.hasher: Optional[_SourceHash] = None
        self.notes: list[str] = []
        self.overflow: dict[str, int] = {}
        self.outputs: list[str] = []
        self.index: Optional[str] = None
        self.bytes_written = 0
        self._pending: list[_Pending] = []
        self._committed: list[str] = []
        self._made_dirs: list[str] = []
        self._release = getattr(source, "release", None)
        self._source_fd: Optional[int] = None

    # -- the whole run
    def write(self) -> None:
        n = len(self.shards)
        paths = [self.dest.single] if n == 1 else [self.dest.shard(k + 1, n) for k in range(n)]
        try:
            self._make_directory()
            for path, shard in zip(paths, self.shards):
                self._write_output(path, shard)
                if len(self._pending) >= MAX_PENDING_OUTPUTS:
                    self._commit_pending()
            self._commit_pending()
            if n > 1:
                self._write_index(paths)
        except BaseException:
            self.abandon()
            raise
        finally:
            if self._source_fd is not None:
                os.close(self._source_fd)
                self._source_fd = None
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
        if self.hasher is not None:
            self.hasher.cancel()
        for pending in self._pending:
            try:
                pending.output.__exit__(RuntimeError, RuntimeError("conversion failed"), None)
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
    def _write_output(self, path: str, shard: list[_Plan]) -> None:
        prepared = {p.name: writer.PreparedTensor(p.name, DTYPES[p.dtype], tuple(p.info.shape), p.nbytes,
                                                  _unused_load) for p in shard}
        ordered = writer.layout(prepared.values())
        header = self._header(ordered, self.metadata, path)
        plans = {p.name: p for p in shard}
        output = writer.atomic_output(path)
        fd = output.__enter__()
        self._pending.append(_Pending(path, output, fd, ordered, shard, len(header),
                                      self.metadata.get(HASH_KEY) == HASH_PLACEHOLDER))
        with collector_paused():
            writer.write_all(fd, memoryview(header))
            for tensor in ordered:
                self._write_tensor(fd, plans[tensor.name], path)

    def _header(self, ordered: list, metadata: dict[str, str], path: str) -> bytes:
        header = writer.header_for(ordered, metadata)
        if len(header) - 8 > MAX_HEADER_BYTES:
            raise errors.SafeckptError(
                f"the header would be {len(header) - 8} bytes, over the format's {MAX_HEADER_BYTES}-byte limit "
                "(too many tensors or too much metadata for one file): use a smaller shard size", path=path)
        return header

    def _write_tensor(self, fd: int, plan: _Plan, path: str) -> None:
        span = None if plan.cast else self.source.file_span(plan.source)
        if span is not None and self._copy_in_kernel(fd, span, plan):
            if self._release is not None:
                self._release(plan.source)
            return
        written = 0
        for chunk in self._tensor_bytes(plan, path):
            for start in range(0, chunk.nbytes, WRITE_PIECE_BYTES):
                piece = chunk[start:start + WRITE_PIECE_BYTES]
                writer.write_all(fd, piece)
                written += piece.nbytes
                self.done += piece.nbytes
                if self.progress is not None:
                    self.progress(self.done, self.total, plan.name)
        if written != plan.nbytes:
            raise errors.SourceError(
                f"the source gave {written} bytes for a tensor of {plan.nbytes} bytes ({plan.info.dtype} "
                f"{list(plan.info.shape)})", path=self.source.path, tensor=plan.source)
        if self._release is not None:
            self._release(plan.source)

    def _copy_in_kernel(self, fd: int, span: tuple[int, int], plan: _Plan) -> bool:
        """Copy a tensor stored as-is in the source file with copy_file_range: no page faults,
        no user-space copy, no mapped pages left resident. False where the OS cannot."""
        if self._source_fd is None:
            self._source_fd = os.open(self.source.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        offset, remaining = span
        if remaining != plan.nbytes or not hasattr(os, "copy_file_range"):
            return False
        start = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            while remaining:
                copied = os.copy_file_range(self._source_fd, fd, min(remaining, WRITE_PIECE_BYTES), offset)
                if copied == 0:
                    raise errors.SourceError(f"the source file ended at byte {offset} inside the tensor",
                                             path=self.source.path, tensor=plan.source)
                offset, remaining = offset + copied, remaining - copied
                self.done += copied
                if self.progress is not None:
                    self.progress(self.done, self.total, plan.name)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY or remaining != plan.nbytes:
                raise
            os.lseek(fd, start, os.SEEK_SET)
            return False
        return True

    def _tensor_bytes(self, plan: _Plan, path: str) -> Iterator[memoryview]:
        """The bytes the file holds for `plan`, in order: cast in blocks if asked."""
        array = self._read(plan)
        if plan.cast:
            count = 0
            for block, overflow in casting.cast_blocks(array, plan.dtype):
                count += overflow
                yield memoryview(block.view(np.uint8))
            if count:
                self.overflow[plan.name] = count
            return
        value = writer.RawTensor(plan.info.dtype, tuple(plan.info.shape), array) \
            if DTYPES[plan.info.dtype].numpy is None else array
        for chunk in writer.tensor_chunks(value):
            yield chunk.cast("B") if chunk.format != "B" or chunk.ndim != 1 else chunk

    def _read(self, plan: _Plan) -> np.ndarray:
        array = self.source.read(plan.source)
        dtype = DTYPES[plan.info.dtype]
        expected = dtype.numpy if dtype.numpy is not None else np.dtype(np.uint8)
        if not isinstance(array, np.ndarray) or (dtype.numpy is not None and (
                tuple(array.shape) != tuple(plan.info.shape) or array.dtype.newbyteorder("<") != expected)):
            got = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
            raise errors.SourceError(
                f"the source listed {plan.info.dtype}{list(plan.info.shape)} but gave {got}",
                path=self.source.path, tensor=plan.source)
        return array

    # -- committing
    def _commit_pending(self) -> None:
        """Patch in the source hash, verify if asked, then fsync and rename each pending output."""
        for pending in list(self._pending):
            metadata = self.metadata
            if pending.needs_hash:
                metadata = dict(self.metadata, **{HASH_KEY: self._digest()})
                header = writer.header_for(pending.ordered, metadata)
                if len(header) != pending.header_bytes:  # cannot happen: both are 64 hex digits
                    raise AssertionError("the source hash changed the header's length")
                os.pwrite(pending.fd, header, 0)
            if self.verify:
                self._verify_output(pending, metadata)
            self._pending.remove(pending)
            pending.output.__exit__(None, None, None)  # fsync, rename, fsync the directory
            self._committed.append(pending.path)

    def _digest(self) -> str:
        digest = self.hasher.result() if self.hasher is not None else None
        if digest is None:
            error = self.hasher.error if self.hasher is not None else "no hash was computed"
            raise errors.SourceError(f"cannot hash the source: {error}; pass source_hash=False to convert "
                                     "without its sha256", path=self.source.path)
        return digest

    def _write_index(self, paths: list[str]) -> None:
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {p.name: os.path.basename(path) for path, shard in zip(paths, self.shards)
                                for p in shard}}
        data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
        with writer.atomic_output(self.dest.index) as fd:
            writer.write_all(fd, memoryview(data))
        self._committed.append(self.dest.index)
        self.index = self.dest.index

    # -- verifying
    def _verify_output(self, pending: _Pending, metadata: dict[str, str]) -> None:
        """Re-read a written file (before it replaces anything): the strict reader must accept
        its header, and every tensor's bytes must equal the source's (or its cast)."""
        temp = pending.output.temp
        with SafetensorsFile(temp, backend="pread") as file:  # pread: only the header is read here
            header = file.header
        if header.metadata != metadata or set(header.tensors) != {p.name for p in pending.plans}:
            raise errors.SafeckptError("verification failed: the header does not list what was written",
                                       path=pending.path)
        fd = os.open(temp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for plan in pending.plans:
                info = header.tensors[plan.name]
                if (info.dtype, tuple(info.shape)) != (plan.dtype, tuple(plan.info.shape)):
                    raise errors.SafeckptError(
                        f"verification failed: written as {info.dtype}{list(info.shape)}, expected "
                        f"{plan.dtype}{list(plan.info.shape)}", path=pending.path, tensor=plan.name)
                self._verify_tensor(fd, header.data_start + info.data_offsets[0], plan, pending.path)
        finally:
            os.close(fd)

    def _verify_tensor(self, fd: int, offset: int, plan: _Plan, path: str) -> None:
        position = 0
        for chunk in self._tensor_bytes(plan, path):
            expected = np.frombuffer(chunk, np.uint8)
            for start in range(0, expected.size, VERIFY_PIECE_BYTES):
                want = expected[start:start + VERIFY_PIECE_BYTES]
                have = np.frombuffer(os.pread(fd, want.size, offset + position), np.uint8)
                if have.size != want.size or not np.array_equal(have, want):
                    where = position + (int(np.argmax(have != want)) if have.size == want.size else have.size)
                    raise errors.SafeckptError(
                        f"verification failed: byte {where} of the tensor differs from the source"
                        f"{' cast to ' + plan.dtype if plan.cast else ''}", path=path, tensor=plan.name)
                position += want.size
        if position != plan.nbytes:
            raise errors.SafeckptError(f"verification failed: {plan.nbytes} bytes stored, {position} expected",
                                       path=path, tensor=plan.name)
        if self._release is not None:
            self._release(plan.source)


def _unused_load():  # PreparedTensor wants a loader; convert streams bytes itself
    raise AssertionError("convert writes tensors from the source, not through PreparedTensor.load")


# --- helpers -----------------------------------------------------------------------

def _open(path: str, allow_unsafe: bool) -> TensorSource:
    from ..sources.detect import open_source  # at call time: detect grows with every format

    try:
        return open_source(path)
    except errors.SafeckptError:
        if os.path.isfile(path):
            _check_safety([path], allow_unsafe)  # a hostile file that is also malformed: say it is hostile
        raise


def _files_read(source: TensorSource) -> list[str]:
    """The files a source reads: each shard of a sharded checkpoint, else its own path."""
    shards = getattr(source, "shards", None)
    return [shard.path for shard in shards.values()] if isinstance(shards, dict) and shards else [source.path]


def _check_safety(paths: list[str], allow: bool):
    """Scan the files; a malicious one is refused unless `allow` (nothing is executed either way).

    Returns the report of the worst file.
    """
    from .scan import scan  # at call time: scan imports every source module

    rank = {"safe": 0, "suspicious": 1, "malicious": 2}
    worst = None
    for path in paths:
        report = scan(path)
        if worst is None or rank.get(report.verdict, 1) > rank.get(worst.verdict, 1):
            worst = report
        if report.verdict == "malicious" and not allow:
            found = [f for f in report.findings if f.severity == "malicious"] or report.findings
            listed = "; ".join(f"{f.what} ({f.why})" for f in found[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise errors.UnsafeFileError(
                f"refusing to convert: the scan found {len(found)} malicious findings: {listed}{more}. Nothing "
                "was executed or written. Run `safeckpt scan` for details; convert anyway with "
                "allow_unsafe_structure=True (--allow-unsafe-structure): the file's code is never run",
                report=report, path=path)
    return worst


def _globs(value: "Sequence[str] | str | None", what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    globs = tuple(value)
    if not all(isinstance(g, str) for g in globs):
        raise errors.SafeckptError(f"{what} must be a list of name globs (strings), got {value!r}")
    return globs


__all__ = ["convert", "ConvertReport", "Choice", "choose_tensors", "parse_size", "MAX_TREE_JSON_BYTES"]
