"""verify: is a checkpoint intact? Its structure first (every format), then its BLAKE3 hashes.

What PATH may be
----------------
- a file of any format `open_source` reads. A file *named* ``*.safetensors`` is held
  to its name: the strict safetensors reader checks it, and a pickle saved under that
  name is invalid whatever it holds. Any other file is recognised by its content;
- a sharded model: its index JSON, or the folder holding it;
- a training checkpoint of `CheckpointManager`: one ``step-*`` directory, or the
  manager's directory (each committed step in it);
- any other folder: each checkpoint file under it (by content), on its own.

Structure
---------
safetensors: the strict reader (length prefix, header JSON, dtypes, shapes, tensors
tiling the data buffer). Other formats: their parser's checks, with every tensor read
once, and every tensor's bytes that have a place in the file must lie inside it. A Git
LFS pointer saved in place of the file is named as such, whatever the format.

Manifests
---------
``verify(path, write=True)`` records BLAKE3 hashes in a manifest beside PATH:

- a file ``model.safetensors`` -> ``model.safetensors.blake3.json``;
- a sharded model whose index is ``model.safetensors.index.json`` ->
  ``model.safetensors.index.json.blake3.json`` beside it, covering the index and each
  shard it names.

A training checkpoint has its ``manifest.json`` already (written by each save): it is
checked, never written here. Manifests are JSON as `safeckpt.ops.integrity.encode_manifest`
writes it: one member a line, ending with the hash of every byte before it, so an edited
manifest is detected (here by encoding the parsed document again: any byte that differs
from what safeckpt wrote shows)::

    {
     "format": "safeckpt-hashes",
     "schema_version": 1,
     "hash": "blake3",
     "written_by": "safeckpt 0.1.0",
     "time": 1732400000.5,
     "files": {"model.safetensors":{"size":4224,"blake3":"…","format":"safetensors","hashed":"ranges",
                "header":{"range":[0,128],"blake3":"…"},"tensors":{"w":{"range":[128,4224],"blake3":"…"}}},
               "model.pt":{"size":5120,"blake3":"…","format":"torch-zip",
                "tensors":{"w":{"range":[704,4800],"blake3":"…"},"b":{"nbytes":16,"blake3":"…"}}}},
     "manifest_blake3": "…"
    }

(members wrapped here to fit). A tensor's hash is the BLAKE3 of its bytes as a
safetensors file stores them (C order, little-endian), so a ``.pt`` file and its
conversion record equal tensor hashes. Bytes that lie in the file as stored (``range``)
are hashed straight from the mapped file; others from the tensor's values (``nbytes``).
A safetensors file is hashed range by range (``"hashed": "ranges"``): its header and
tensors tile it, so each byte is hashed once and the file's ``blake3`` is `root_hash` of
the ranges' hashes -- the layout training checkpoints use (so it is not what ``b3sum``
prints). Other files are hashed whole (``b3sum``'s value); their tensors are hashed
again on write, and on check only when the file's hash differs, to name the tensor.

Hashing runs on all cores: a large range on BLAKE3's own threads, block by block; runs
of small ranges as batches on a thread pool. Mapped pages are dropped behind the
hashing, so memory stays bounded whatever the file size.

Checking
--------
A structural error ends the check of that file. With a manifest: files it records that
are gone, files it does not record, then per file its size, its tensors' names, and the
hashes in file order; the first damaged tensor is named, with its file. Without one the
structure is all there is to check (``VerifyReport.hashes == "missing"``).

The Hub and Git LFS
-------------------
``sha256=True`` adds each file's sha256: the oid the Hub shows for an LFS file.
``lfs_pointer=FILE`` compares the file's size and sha256 with a Git LFS pointer::

    version https://git-lfs.github.com/spec/v1
    oid sha256:4d7a2146…(64 hex digits)
    size 4224

`VerifyReport.exit_code`: 0 intact, 1 invalid, damaged or different, 2 unreadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from .. import errors
from ..format.dtypes import dtype_for_numpy
from ..format.reader import SafetensorsFile
from ..format.writer import atomic_output, tensor_chunks, write_all
from ..sources.base import TensorSource, mapped
from ..sources.detect import SNIFF_BYTES, open_source, sniff
from ..sources.sharded import find_index
from . import integrity
from .integrity import HASH, RANGES, new_hasher, root_hash

Progress = Callable[[int, int, str], None]

MANIFEST_SUFFIX = ".blake3.json"
MANIFEST_FORMAT = "safeckpt-hashes"
MANIFEST_SCHEMA_VERSION = 1
# A manifest of a million tensors is ~200 MB; anything larger is not one of ours.
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
# Git LFS never reads a larger file as a pointer (its blob size cutoff).
MAX_POINTER_BYTES = 1024
LFS_VERSIONS = ("https://git-lfs.github.com/spec/v1", "https://hawser.github.com/spec/v1")
# A range this large is hashed on all cores, block by block (each block a progress step);
# smaller ones go, several at a time, to a pool thread each batch.
BATCH_BYTES = 8 * 1024 * 1024
BATCH_RANGES = 1024
HASH_BLOCK_BYTES = 64 * 1024 * 1024
SHA256_BLOCK_BYTES = 16 * 1024 * 1024
# Files looked at in a plain folder.
MAX_DIRECTORY_FILES = 100_000
# The training checkpoint's files (see safeckpt.training.manager).
CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_TENSORS = "tensors.safetensors"
CHECKPOINT_STATE = "state.json"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_POINTER_KEY = re.compile(r"[a-z0-9.-]+")
_POINTER_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")
_STATUS_CODES = {"ok": 0, "invalid": 1, "error": 2}

_PLAIN_ADVICE = "; restore or download it again (after a deliberate change, run `safeckpt verify --write` again)"
_CHECKPOINT_ADVICE = "; the checkpoint cannot be trusted: restore another step"


# --- the report ---------------------------------------------------------------------

@dataclass
class VerifyReport:
    """The verdict on one PATH; a folder of checkpoints has one child report per checkpoint.

    `hashes`: "verified" (the manifest matches), "written", "missing" (no manifest: the
    structure was checked), "failed" (the manifest is damaged or does not match) or
    "unchecked" (the structure failed first). `failed_file` / `failed_tensor` name the
    first problem; `problems` lists one line per problem found.
    """

    path: str
    kind: str  # "file", "sharded", "checkpoint", "checkpoints" (a manager's directory), "directory"
    status: str = "ok"  # "ok", "invalid" (read, and not intact), "error" (could not be read)
    format: Optional[str] = None
    tensors: Optional[int] = None
    parameters: Optional[int] = None
    size: Optional[int] = None  # bytes of the files checked
    files: list[str] = field(default_factory=list)
    manifest: Optional[str] = None
    hashes: str = "missing"
    error: Optional[str] = None
    error_type: Optional[str] = None
    failed_file: Optional[str] = None
    failed_tensor: Optional[str] = None
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # files the manifest records that are gone
    extra: list[str] = field(default_factory=list)  # files the manifest does not record
    sha256: dict[str, str] = field(default_factory=dict)
    lfs: Optional[dict] = None  # {"pointer", "oid", "size", "match"}
    hashed_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    children: list["VerifyReport"] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and all(child.ok for child in self.children)

    @property
    def exit_code(self) -> int:
        """0 intact, 1 invalid or damaged, 2 unreadable: the worst over the children too."""
        return max([_STATUS_CODES[self.status]] + [child.exit_code for child in self.children])

    def leaves(self) -> list["VerifyReport"]:
        """The reports without children: one per file, sharded model or checkpoint."""
        if not self.children:
            return [self]
        return [leaf for child in self.children for leaf in child.leaves()]

    def to_dict(self) -> dict:
        out = {key: getattr(self, key) for key in self.__dataclass_fields__ if key != "children"}
        out["exit_code"] = self.exit_code
        out["children"] = [child.to_dict() for child in self.children]
        return out

    def fail(self, exc: BaseException, path: str) -> None:
        """Record a problem met while checking `path` (an error that names no file is said to be about it)."""
        status, message = describe(exc, path)
        self.add_problem(status, message, type(exc).__name__,
                         getattr(exc, "path", None) or getattr(exc, "filename", None) or path,
                         getattr(exc, "tensor", None))

    def add_problem(self, status: str, message: str, error_type: str, file: Optional[str] = None,
                    tensor: Optional[str] = None) -> None:
        """Record a problem; the first one is the report's `error`."""
        self.problems.append(message)
        if self.error is None:
            self.error, self.error_type, self.failed_file, self.failed_tensor = message, error_type, file, tensor
        if _STATUS_CODES[status] > _STATUS_CODES[self.status]:
            self.status = status


def describe(exc: BaseException, path: str) -> tuple[str, str]:
    """("invalid" or "error", one message naming the file) for a SafeckptError or an OSError.

    Other exceptions are bugs: they are raised again.
    """
    if isinstance(exc, errors.SafeckptError):
        return "invalid", str(exc) if exc.path is not None else f"{path}: {exc}"
    if isinstance(exc, OSError):
        return "error", f"{exc.filename or path}: cannot read: {exc.strerror or exc}"
    raise exc


# --- public API -----------------------------------------------------------------------

def verify(path: "os.PathLike | str", *, write: bool = False, sha256: bool = False,
           lfs_pointer: "os.PathLike | str | LfsPointer | None" = None,
           progress: Optional[Progress] = None) -> VerifyReport:
    """Check a checkpoint's structure, then its hashes against the manifest beside it.

    `path` is a file of any format safeckpt reads, a sharded model (index or folder), a
    training checkpoint (a step directory or a CheckpointManager directory) or a folder
    of checkpoints. With `write`, the manifest is (re)written after the structure
    checks out, instead of being checked. `sha256` adds each file's sha256 (the Hub's
    LFS oid); `lfs_pointer` (a Git LFS pointer file) compares the file's size and
    sha256 with it. `progress(done_bytes, total_bytes, name)` is called while hashing.

    Damage is reported, never raised: see `VerifyReport.ok` and `.exit_code`. A bad
    `lfs_pointer`, or one given with a folder, raises SafeckptError.

    >>> verify("model.safetensors", write=True).hashes
    'written'
    >>> report = verify("model.safetensors")
    >>> report.ok, report.failed_tensor
    (True, None)
    """
    started = time.perf_counter()
    path = os.fspath(path)
    pointer = lfs_pointer if isinstance(lfs_pointer, LfsPointer) or lfs_pointer is None \
        else read_lfs_pointer(lfs_pointer)
    if pointer is not None and os.path.isdir(path):
        raise errors.SafeckptError("an LFS pointer describes one file, not a folder: verify the file it "
                                   "points to", path=path)
    meter = _Meter(progress)
    options = _Options(write, sha256, pointer, meter)
    report = _verify_path(path, options)
    report.hashed_bytes = meter.done
    report.seconds = time.perf_counter() - started
    return report


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
        dropper = _PageDropper(data)
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


def manifest_path(path: "os.PathLike | str") -> str:
    """Where the manifest of a file or sharded model goes: ``<file>.blake3.json``
    (for a sharded model, beside its index: ``<index>.blake3.json``).

    >>> manifest_path("model.safetensors")
    'model.safetensors.blake3.json'
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        index = find_index(path)
        if index is None:
            raise errors.SafeckptError("a folder has a manifest only when it holds a sharded model (an "
                                       "*.index.json)", path=path)
        path = index
    return path + MANIFEST_SUFFIX


# --- Git LFS pointers -------------------------------------------------------------------

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
    with open(path, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise errors.SafeckptError("an LFS pointer must be a regular file", path=path)
        return parse_lfs_pointer(file.read(MAX_POINTER_BYTES + 1), path)


# --- dispatch -------------------------------------------------------------------------

@dataclass
class _Options:
    write: bool
    sha256: bool
    pointer: Optional[LfsPointer]
    meter: "_Meter"


def _verify_path(path: str, options: _Options) -> VerifyReport:
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            return _verify_directory(path, options)
        if not stat.S_ISREG(mode):
            raise OSError(0, "not a regular file", path)
        head = _head(path)
    except OSError as exc:
        report = VerifyReport(path, "directory" if os.path.isdir(path) else "file", hashes="unchecked")
        report.fail(exc, path)
        return report
    if sniff(head) == "json" and not path.endswith(".safetensors"):
        return _verify_sharded(path, path, options)
    report = VerifyReport(path, "file")
    folder, name = os.path.split(path)
    return _verify_files(report, folder, [name], path + MANIFEST_SUFFIX, options)


def _verify_directory(path: str, options: _Options) -> VerifyReport:
    from ..training.policy import step_from_name
    names = os.listdir(path)
    if CHECKPOINT_MANIFEST in names and (step_from_name(os.path.basename(os.path.normpath(path))) is not None
                                         or CHECKPOINT_TENSORS in names or CHECKPOINT_STATE in names):
        return _verify_checkpoint(path, None, options)
    if any(step_from_name(name) is not None and os.path.isdir(os.path.join(path, name)) for name in names):
        return _verify_manager_directory(path, options)
    index = find_index(path)
    if index is not None:
        return _verify_sharded(path, index, options)
    return _verify_loose(path, options)


def _verify_loose(path: str, options: _Options) -> VerifyReport:
    """Each checkpoint file under a folder (by content; our manifests and JSON are skipped), on its own."""
    report = VerifyReport(path, "directory", hashes="unchecked")
    found: list[str] = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            candidate = os.path.join(root, name)
            if len(found) >= MAX_DIRECTORY_FILES:
                report.notes.append(f"more than {MAX_DIRECTORY_FILES} checkpoint files: the rest were not checked")
                break
            if _is_checkpoint_file(candidate):
                found.append(candidate)
    if not found:
        report.add_problem("error", f"{path}: no *.safetensors files (nor files of another format safeckpt "
                                    "reads) in this directory", "NotFound", path)
        return report
    options.meter.plan(sum((_size(p) or 0) * (int(options.write or os.path.exists(p + MANIFEST_SUFFIX))
                                               + int(options.sha256)) for p in found))
    report.children = [_verify_path(candidate, options) for candidate in found]
    return report


def _is_checkpoint_file(path: str) -> bool:
    if path.endswith(MANIFEST_SUFFIX):
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # fifos and devices: reading them could block forever
        if path.endswith(".safetensors"):
            return True
        return sniff(_head(path)) in ("safetensors", "zip", "npy", "tar", "pickle")
    except OSError:
        return path.endswith(".safetensors")  # unreadable: its report says so


# --- files and sharded models -----------------------------------------------------------

def _verify_sharded(path: str, index: str, options: _Options) -> VerifyReport:
    report = VerifyReport(path, "sharded")
    try:
        with open_source(index) as source:  # checks the index against every shard it names
            shards = sorted(getattr(source, "shards", {}))
            if not shards:
                raise errors.SourceError("not a sharded-checkpoint index: it names no shards", path=index)
            report.format = f"sharded {'/'.join(sorted({s.format for s in source.shards.values()}))}"
            report.tensors = len(source.infos)
            report.parameters = sum(info.numel for name, info in source.infos.items() if name not in source.aliases)
    except (errors.SafeckptError, OSError) as exc:
        report.hashes = "unchecked"
        report.fail(exc, index)
        return report
    folder, name = os.path.split(index)
    return _verify_files(report, folder, [name] + shards, index + MANIFEST_SUFFIX, options, index=name)


def _verify_files(report: VerifyReport, folder: str, names: list[str], manifest: str, options: _Options,
                  index: Optional[str] = None) -> VerifyReport:
    """Structure and hashes of the files `names` (relative to `folder`), against `manifest`."""
    paths = {name: os.path.join(folder, name) for name in names}
    report.files = list(paths.values())
    report.manifest = manifest
    report.size = sum(_size(path) or 0 for path in paths.values())
    recorded = None
    if not options.write:
        try:
            recorded = load_manifest(manifest)
        except (errors.SafeckptError, OSError) as exc:
            report.fail(exc, manifest)
            report.hashes = "failed"
        if recorded is None and report.hashes == "missing":
            report.manifest = None
    if options.write or recorded is not None:
        options.meter.expect(report.size)
    damaged = recorded is not None and _compare_file_lists(report, folder, set(names), recorded["files"], manifest)
    entries: dict[str, dict] = {}
    structure_failed = False
    first = paths[names[0]]
    with _Sha256Jobs(paths.values() if options.sha256 or options.pointer else (), options.meter) as jobs:
        if options.pointer is not None:
            _compare_pointer_size(report, first, _size(first), options.pointer)
        tensors = parameters = 0
        for name, path in paths.items():
            try:
                with _open_layout(path, is_index=name == index) as layout:
                    tensors += len(layout.tensors)
                    parameters += layout.parameters
                    report.format = report.format or layout.format
                    if options.write:
                        entries[name] = _file_entry(layout, options.meter)
                    elif recorded is not None and name in recorded["files"]:
                        _check_file(layout, recorded["files"][name], options.meter, _PLAIN_ADVICE)
            except errors.IntegrityError as exc:
                damaged = True
                report.fail(exc, path)
            except (errors.SafeckptError, OSError) as exc:
                structure_failed = True
                report.fail(exc, path)
        if report.kind == "file":
            report.tensors, report.parameters = tensors, parameters
        report.sha256 = jobs.results(report)
    if options.pointer is not None:
        _compare_pointer_oid(report, first, options.pointer)
    if options.write:
        if report.status == "ok":
            _write_manifest(manifest, entries)
        report.hashes = "written" if report.status == "ok" else "unchecked"
    elif recorded is not None:
        report.hashes = "failed" if damaged else "unchecked" if structure_failed else "verified"
    return report


def _compare_file_lists(report: VerifyReport, folder: str, names: set[str], recorded: Mapping[str, Any],
                        manifest: str) -> bool:
    """Files the manifest records that are gone, and files it does not record; True if any."""
    for name in recorded:
        if name not in names:
            path = os.path.join(folder, name)
            report.missing.append(path)
            gone = not os.path.lexists(path)
            report.fail(errors.IntegrityError(
                f"is {'missing' if gone else 'no longer part of the model (its index does not name it)'}; the "
                f"manifest {manifest} records it" + _PLAIN_ADVICE, path=path), path)
    for name in sorted(names):
        if name not in recorded:
            path = os.path.join(folder, name)
            report.extra.append(path)
            report.fail(errors.IntegrityError(
                f"is not in the manifest {manifest}: it was added or renamed after the manifest was written "
                "(if that was deliberate, run `safeckpt verify --write` again)", path=path), path)
    return bool(report.missing or report.extra)


def _compare_pointer_size(report: VerifyReport, path: str, size: Optional[int], pointer: LfsPointer) -> None:
    report.lfs = {"pointer": pointer.path, "oid": pointer.oid, "size": pointer.size, "match": None}
    if size is not None and size != pointer.size:
        report.lfs["match"] = False
        report.fail(errors.IntegrityError(
            f"is {size:,} bytes but the LFS pointer{_named(pointer)} says {pointer.size:,}: the download is "
            "incomplete, or this is another file", path=path), path)


def _compare_pointer_oid(report: VerifyReport, path: str, pointer: LfsPointer) -> None:
    digest = report.sha256.get(path)
    if digest is None or report.lfs is None or report.lfs["match"] is False:
        return
    report.lfs["match"] = digest == pointer.oid
    if digest != pointer.oid:
        report.fail(errors.IntegrityError(
            f"its sha256 {digest} differs from the oid {pointer.oid} of the LFS pointer{_named(pointer)}: "
            "the file is damaged, or another version of it", path=path), path)


# --- the layout of one file ---------------------------------------------------------------

@dataclass
class _Layout:
    """What the structure check learned about one file; enough to hash it."""

    path: str
    format: str
    size: int
    tensors: dict[str, Optional[tuple[int, int]]]  # name -> its bytes in the file, or None: from its values
    parameters: int
    header: Optional[tuple[int, int]] = None  # safetensors: the header's bytes (the ranges tile the file)
    source: Optional[TensorSource] = None
    data: Any = None  # the file's bytes, mapped while hashing

    def ranges(self) -> tuple[list[Optional[str]], list[tuple[int, int]]]:
        """A safetensors file's ranges in file order, the header (named None) first: they tile the file."""
        spans = sorted((span, name) for name, span in self.tensors.items())
        return [None] + [name for _, name in spans], [self.header] + [span for span, _ in spans]


@contextlib.contextmanager
def _open_layout(path: str, is_index: bool = False) -> Iterator[_Layout]:
    """Check one file's structure; the layout, with the file mapped for hashing."""
    head = _head(path)
    if not is_index:
        _refuse_pointer(path, head)
    with mapped(path) as data:
        size = len(data)
        if is_index:
            yield _Layout(path, "index", size, {}, 0, data=data)
        elif path.endswith(".safetensors") or sniff(head) == "safetensors":
            with SafetensorsFile(path, backend="pread") as file:
                header = file.header
            start = header.data_start
            if start + header.data_size != size:  # changed between the two opens
                raise errors.SourceError("the file changed while it was being checked; check it again", path=path)
            yield _Layout(path, "safetensors", size,
                          {name: (start + t.data_offsets[0], start + t.data_offsets[1])
                           for name, t in header.tensors.items()},
                          sum(t.numel for t in header.tensors.values()), (0, start), data=data)
        else:
            with open_source(path) as source:
                spans = _source_spans(source, size)
                parameters = sum(info.numel for name, info in source.infos.items() if name not in source.aliases)
                yield _Layout(path, source.format, size, spans, parameters, source=source, data=data)


def _source_spans(source: TensorSource, size: int) -> dict[str, Optional[tuple[int, int]]]:
    """Each tensor's bytes in the file (checked to lie inside it), or None; tensors without
    a place in the file are read once, so that their parser checks them."""
    spans: dict[str, Optional[tuple[int, int]]] = {}
    for name in source.infos:
        span = source.file_span(name)
        if span is None:
            source.read(name)
            source.release(name)
            spans[name] = None
            continue
        offset, nbytes = span
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            raise errors.SourceError(f"the tensor's bytes [{offset}, {offset + nbytes}) run past the end of the "
                                     f"file ({size:,} bytes): it is truncated", path=source.path, tensor=name)
        spans[name] = (offset, offset + nbytes)
    return spans


def _refuse_pointer(path: str, head: bytes) -> None:
    """A Git LFS pointer where the checkpoint should be: say so, whatever the file is named."""
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


# --- hashing one file ----------------------------------------------------------------------

def _file_entry(layout: _Layout, meter: "_Meter") -> dict:
    """The manifest entry of a file: its size and hash, each tensor's hash."""
    if layout.header is not None:
        names, ranges = layout.ranges()
        digests = list(_range_digests(layout.data, ranges, meter, layout.path))
        return {"size": layout.size, HASH: root_hash(digests), "format": layout.format, "hashed": RANGES,
                "header": {"range": list(ranges[0]), HASH: digests[0]},
                "tensors": {name: {"range": list(span), HASH: digest}
                            for name, span, digest in zip(names[1:], ranges[1:], digests[1:])}}
    (whole,) = _range_digests(layout.data, [(0, layout.size)], meter, layout.path)
    entry: dict[str, Any] = {"size": layout.size, HASH: whole, "format": layout.format}
    if layout.tensors:
        meter.expect(_tensor_bytes(layout), extra=True)
        entry["tensors"] = {name: ({"range": list(span)} if span else {"nbytes": layout.source.infos[name].nbytes})
                            | {HASH: digest}
                            for name, span, digest in _tensor_digests(layout, meter)}
    return entry


def _check_file(layout: _Layout, entry: Mapping[str, Any], meter: "_Meter", advice: str) -> None:
    """Compare a file with its manifest entry; IntegrityError naming the first damaged tensor."""
    path = layout.path
    recorded_format = entry.get("format")
    if recorded_format is not None and recorded_format != layout.format:
        raise errors.IntegrityError(f"the manifest records a {recorded_format} file, but this is a {layout.format} "
                                    "file (it was replaced)" + advice, path=path)
    recorded = entry.get("tensors", {})
    if layout.header is not None:
        _check_ranges(layout, entry, meter, advice)
        return
    _compare_tensor_names(layout, recorded, advice)
    resized = _resized(layout, entry)
    (whole,) = _range_digests(layout.data, [(0, layout.size)], meter, path)
    if whole == entry[HASH] and not resized:
        return
    meter.expect(_tensor_bytes(layout), extra=True)
    for name, _, digest in _tensor_digests(layout, meter):
        if digest != recorded[name][HASH]:
            raise _damaged(path, name, resized, advice)
    raise errors.IntegrityError(f"its bytes differ from the manifest's hash{resized} outside the tensors' values "
                                "(its pickle, archive records or metadata changed)" + advice, path=path)


def _compare_tensor_names(layout: _Layout, recorded: Mapping[str, Any], advice: str) -> None:
    gone = [name for name in recorded if name not in layout.tensors]
    if gone:
        raise errors.IntegrityError(f"the manifest records this tensor, and the file no longer holds it ({len(gone)} "
                                    "tensors are gone)" + advice, path=layout.path, tensor=gone[0])
    new = [name for name in layout.tensors if name not in recorded]
    if new:
        raise errors.IntegrityError(f"the file holds this tensor, and the manifest does not ({len(new)} tensors "
                                    "are new)" + advice, path=layout.path, tensor=new[0])


def _resized(layout: _Layout, entry: Mapping[str, Any]) -> str:
    return "" if layout.size == entry["size"] else \
        f" (it is {layout.size:,} bytes; the manifest records {entry['size']:,})"


def _check_ranges(layout: _Layout, entry: Mapping[str, Any], meter: "_Meter", advice: str) -> None:
    """A safetensors file, range by range in file order (as `integrity` hashes a checkpoint's tensors)."""
    if entry.get("hashed") != RANGES or not isinstance(entry.get("header"), Mapping):
        raise errors.IntegrityError("the manifest does not record this file's ranges; write it again with "
                                    "`safeckpt verify --write`", path=layout.path)
    _compare_tensor_names(layout, entry.get("tensors", {}), advice)
    resized = _resized(layout, entry)
    names, ranges = layout.ranges()
    digests, header_changed = [], False
    for name, digest in zip(names, _range_digests(layout.data, ranges, meter, layout.path)):
        if name is None:
            header_changed = digest != entry["header"][HASH]
        elif digest != entry["tensors"][name][HASH]:
            raise _damaged(layout.path, name, resized, advice,
                           " (its header differs from the manifest's too)" if header_changed else "")
        digests.append(digest)
    if header_changed:
        raise errors.IntegrityError(f"its header (tensor names, dtypes, shapes, offsets or __metadata__) differs "
                                    f"from the manifest's hash{resized}, while every tensor's bytes match" + advice,
                                    path=layout.path)
    if resized or root_hash(digests) != entry[HASH]:
        raise errors.IntegrityError(f"its bytes differ from the manifest's hash{resized}" + advice, path=layout.path)


def _damaged(path: str, tensor: str, resized: str, advice: str, also: str = "") -> errors.IntegrityError:
    return errors.IntegrityError(f"the tensor's bytes differ from the manifest's BLAKE3 hash{resized}{also} (the "
                                 "file is damaged, or changed after the manifest was written)" + advice,
                                 path=path, tensor=tensor)


def _tensor_bytes(layout: _Layout) -> int:
    return sum(layout.source.infos[name].nbytes for name in layout.tensors)


def _tensor_digests(layout: _Layout, meter: "_Meter") -> Iterator[tuple[str, Optional[tuple[int, int]], str]]:
    """(name, span or None, hash) of every tensor: those with bytes in the file first, in file order."""
    placed = sorted((span, name) for name, span in layout.tensors.items() if span is not None)
    for (span, name), digest in zip(placed, _range_digests(layout.data, [s for s, _ in placed], meter,
                                                            layout.path)):
        yield name, span, digest
    for name, span in layout.tensors.items():
        if span is None:
            yield name, None, _value_digest(layout.source, name, meter)


def _value_digest(source: TensorSource, name: str, meter: "_Meter") -> str:
    """BLAKE3 of a tensor's bytes as a safetensors file stores them, from its values."""
    array = source.read(name)
    hasher = new_hasher(array.nbytes)
    if dtype_for_numpy(array.dtype) is None:
        chunks: Any = [memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))]
    else:
        chunks = tensor_chunks(array)
    for chunk in chunks:
        hasher.update(chunk)
        meter.tick(chunk.nbytes, source.path)
    source.release(name)
    return hasher.hexdigest()


# --- the hashing engine ---------------------------------------------------------------------

def _range_digests(data: Any, ranges: Sequence[tuple[int, int]], meter: "_Meter", name: str) -> Iterator[str]:
    """The hex BLAKE3 of each ``(begin, end)`` range of `data`, in order, on all cores.

    A large range is hashed on BLAKE3's own threads, block by block; runs of small ones
    go in batches to a thread pool (BLAKE3 releases the GIL). Mapped pages behind the
    hashing are dropped. Stopping early (closing the generator) cancels what is queued.
    """
    view = memoryview(data) if len(data) else memoryview(b"")
    dropper = _PageDropper(data)
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


def _hash_large(view: memoryview, begin: int, end: int, meter: "_Meter", name: str,
                dropper: "_PageDropper") -> str:
    hasher = new_hasher(end - begin)
    for start in range(begin, end, HASH_BLOCK_BYTES):
        stop = min(end, start + HASH_BLOCK_BYTES)
        hasher.update(view[start:stop])
        dropper.drop(stop)
        meter.tick(stop - start, name)
    return hasher.hexdigest()


def _collect(item: tuple[Future, int, int], meter: "_Meter", name: str, dropper: "_PageDropper") -> list[str]:
    future, nbytes, end = item
    digests = future.result()
    dropper.drop(end)
    meter.tick(nbytes, name)
    return digests


class _PageDropper:
    """Drops a mapping's pages once hashed, in order (re-read if needed again): bounded memory."""

    def __init__(self, data: Any) -> None:
        advice = getattr(mmap, "MADV_DONTNEED", None)
        self.mapping = data if isinstance(data, mmap.mmap) and advice is not None else None
        self.advice = advice
        self.done = 0

    def drop(self, end: int) -> None:
        if self.mapping is None:
            return
        end -= end % mmap.PAGESIZE
        if end > self.done:
            with contextlib.suppress(OSError, ValueError):
                self.mapping.madvise(self.advice, self.done, end - self.done)
            self.done = end


class _Meter:
    """Bytes hashed so far, for `progress(done, total, name)`; ticks come from several threads."""

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
        with self.lock:
            self.done += nbytes
            if name:
                self.name = name
            if self.progress is not None:
                self.progress(self.done, max(self.total, self.done), self.name)


class _Sha256Jobs:
    """The sha256 of files, on a thread pool beside the BLAKE3 pass (hashlib releases the GIL)."""

    def __init__(self, paths: Any, meter: _Meter) -> None:
        self.paths = list(paths)
        self.meter = meter
        self.pool: Optional[ThreadPoolExecutor] = None
        self.futures: dict[str, Future] = {}
        self.stop = threading.Event()

    def __enter__(self) -> "_Sha256Jobs":
        if self.paths:
            self.meter.expect(sum(_size(path) or 0 for path in self.paths))
            self.pool = ThreadPoolExecutor(min(len(self.paths), os.cpu_count() or 1),
                                           thread_name_prefix="safeckpt-sha256")
            self.futures = {path: self.pool.submit(_sha256, path, lambda n, p=path: self.meter.tick(n, p),
                                                   self.stop)
                            for path in self.paths}
        return self

    def results(self, report: VerifyReport) -> dict[str, str]:
        """Each file's hex sha256; a file that could not be read is a problem of `report`."""
        out = {}
        for path, future in self.futures.items():
            try:
                out[path] = future.result()
            except (OSError, errors.SafeckptError) as exc:
                if report.status == "ok":  # else the file's own check has said what is wrong
                    report.fail(exc, path)
        return out

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.stop.set()
            self.pool.shutdown(wait=True, cancel_futures=True)


# --- manifests --------------------------------------------------------------------------

def load_manifest(path: "os.PathLike | str") -> Optional[dict]:
    """The checked manifest at `path`, or None if there is none.

    IntegrityError when any byte differs from what safeckpt wrote (the manifest encodes
    its own hash) or when it is not a manifest of ours.

    >>> load_manifest("model.safetensors.blake3.json")["files"]["model.safetensors"]["size"]
    4224
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise errors.IntegrityError(f"is larger than {MAX_MANIFEST_BYTES:,} bytes: not a safeckpt manifest",
                                    path=path)
    document = _decode(raw, path)
    _check_document(document, path)
    return document


def _decode(raw: bytes, path: str) -> dict:
    edited = errors.IntegrityError("its bytes differ from what safeckpt wrote (its self-hash does not match): "
                                   "the manifest was edited or damaged; write it again with `safeckpt verify "
                                   "--write` from a copy you trust", path=path)
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise edited from None
    if not isinstance(document, dict) or list(document)[-1:] != ["manifest_blake3"]:
        raise edited
    del document["manifest_blake3"]
    try:
        again = integrity.encode_manifest(document)
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        raise edited from None
    if again != raw:
        raise edited
    return document


def _check_document(document: dict, path: str) -> None:
    """The manifest's shape: what reading it relies on, with a clear error for anything else."""
    def malformed(detail: str) -> errors.IntegrityError:
        return errors.IntegrityError(f"is not a safeckpt hash manifest ({detail})", path=path)

    if document.get("format") != MANIFEST_FORMAT:
        raise malformed(f"its format is {document.get('format')!r}, not {MANIFEST_FORMAT!r}")
    if document.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise errors.IntegrityError(f"has schema version {document.get('schema_version')!r}; this safeckpt reads "
                                    f"version {MANIFEST_SCHEMA_VERSION}: upgrade safeckpt", path=path)
    files = document.get("files")
    if not isinstance(files, dict) or not files:
        raise malformed("no files")
    for name, entry in files.items():
        pieces = name.split("/")
        if not name or name.startswith("/") or "\\" in name or ".." in pieces or "" in pieces:
            raise malformed(f"file name {name!r} leaves the manifest's folder")
        if not isinstance(entry, dict) or not _entry_ok(entry):
            raise malformed(f"the entry of {name!r} lacks a size, or a hash of the file, its header or a tensor")


def _entry_ok(entry: Mapping[str, Any]) -> bool:
    """A file entry has what checking it reads: a size, a hash, and hashes for its header and tensors."""
    if not _is_size(entry.get("size")) or not _is_hex(entry.get(HASH)) or not isinstance(entry.get("tensors", {}), dict):
        return False
    parts = list(entry.get("tensors", {}).values())
    if entry.get("hashed") == RANGES:
        parts.append(entry.get("header"))
    return all(isinstance(part, dict) and _is_hex(part.get(HASH)) for part in parts)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _write_manifest(path: str, entries: Mapping[str, dict]) -> None:
    from .. import __version__
    document = {"format": MANIFEST_FORMAT, "schema_version": MANIFEST_SCHEMA_VERSION, "hash": HASH,
                "written_by": f"safeckpt {__version__}", "time": time.time(), "files": dict(entries)}
    try:
        raw = integrity.encode_manifest(document)
    except UnicodeEncodeError:
        raise errors.SafeckptError("a tensor or file name is not valid Unicode: it cannot be recorded in a "
                                   "JSON manifest", path=path) from None
    with atomic_output(path) as fd:
        write_all(fd, memoryview(raw))


# --- training checkpoints -------------------------------------------------------------------

def _verify_manager_directory(path: str, options: _Options) -> VerifyReport:
    """Every committed step of a CheckpointManager directory (listed as the manager lists them)."""
    from ..training.manager import inspect_directory
    report = VerifyReport(path, "checkpoints", format="safeckpt-checkpoint", hashes="unchecked")
    try:
        listing = inspect_directory(path)
    except (errors.SafeckptError, OSError) as exc:
        report.fail(exc, path)
        return report
    for name, files in sorted(listing.partials.items()):
        report.notes.append(f"{os.path.join(path, name)} has no manifest.json: an unfinished save, not a "
                            "checkpoint (the next CheckpointManager removes it)")
    options.meter.plan(sum(info.size for info in listing.checkpoints) * (1 + int(options.sha256)))
    children = [(info.step, _verify_checkpoint(_shown(path, info.path), listing.manifests[info.path], options))
                for info in listing.checkpoints]
    for damaged in listing.damaged:
        shown = _shown(path, damaged.path)
        child = VerifyReport(shown, "checkpoint", format="safeckpt-checkpoint", hashes="failed",
                             manifest=os.path.join(shown, CHECKPOINT_MANIFEST))
        child.fail(damaged.error, shown)
        children.append((damaged.step, child))
    report.children = [child for _, child in sorted(children, key=lambda item: (item[0], item[1].path))]
    if not report.children:
        report.add_problem("error", f"{path}: no committed checkpoint in this CheckpointManager directory",
                           "NotFound", path)
    return report


def _verify_checkpoint(path: str, manifest: Optional[dict], options: _Options) -> VerifyReport:
    """One step directory: its manifest.json (decoded by `integrity`), then each file it records."""
    manifest_file = os.path.join(path, CHECKPOINT_MANIFEST)
    report = VerifyReport(path, "checkpoint", format="safeckpt-checkpoint", manifest=manifest_file)
    if options.write:
        report.notes.append("CheckpointManager writes a step's manifest.json when it saves it; --write leaves "
                            "it as it is")
    try:
        if manifest is None:
            with open(manifest_file, "rb") as file:
                manifest = integrity.decode_manifest(file.read(MAX_MANIFEST_BYTES + 1), manifest_file)
        files = manifest.get("files")
        if not isinstance(files, dict) or not isinstance(files.get(CHECKPOINT_TENSORS), dict):
            raise errors.IntegrityError(f"records no {CHECKPOINT_TENSORS}: move this directory away",
                                        path=manifest_file)
        names = [name for name in files if "/" not in name and "\\" not in name and name not in ("", ".", "..")]
        if not all(isinstance(files[name], dict) and _entry_ok(files[name]) for name in names):
            raise errors.IntegrityError("lacks what a manifest records (a size and hash for each file): move this "
                                        "directory away", path=manifest_file)
        extra = sorted(set(os.listdir(path)) - set(names) - {CHECKPOINT_MANIFEST})
    except (errors.SafeckptError, OSError) as exc:
        report.hashes = "failed"
        report.fail(exc, manifest_file)
        return report
    paths = [os.path.join(path, name) for name in names]
    report.files = paths
    report.size = sum(files[name]["size"] for name in names)
    if extra:
        report.notes.append(f"files the manifest does not record (not part of the checkpoint): {', '.join(extra)}")
    report.hashes = "verified"
    options.meter.expect(report.size)
    with _Sha256Jobs([p for p in paths if os.path.isfile(p)] if options.sha256 else (), options.meter) as jobs:
        for name, file_path in zip(names, paths):
            try:
                _check_checkpoint_file(report, name, file_path, files[name], options.meter)
            except FileNotFoundError:
                report.missing.append(file_path)
                report.hashes = "failed"
                report.fail(errors.IntegrityError("is missing; the checkpoint is incomplete: restore another step",
                                                  path=file_path), file_path)
            except (errors.SafeckptError, OSError) as exc:
                report.hashes = "failed"
                report.fail(exc, file_path)
        report.sha256 = jobs.results(report)
    return report


def _check_checkpoint_file(report: VerifyReport, name: str, path: str, entry: dict, meter: _Meter) -> None:
    if name != CHECKPOINT_TENSORS or entry.get("hashed") != RANGES:
        with mapped(path) as data:
            size = len(data)
            integrity.check_file(data, entry, path)
        meter.tick(size, path)
        return
    with _open_layout(path) as layout:  # the strict reader: the structure, then the ranges
        report.tensors, report.parameters = len(layout.tensors), layout.parameters
        _check_ranges(layout, entry, meter, _CHECKPOINT_ADVICE)


# --- small helpers -----------------------------------------------------------------------

def _named(pointer: LfsPointer) -> str:
    return f" {pointer.path}" if pointer.path else ""


def _head(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read(SNIFF_BYTES)


def _size(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _shown(directory: str, path: str) -> str:
    """A step's path as the user named its directory (the manager lists absolute paths)."""
    return os.path.join(directory, os.path.basename(os.path.normpath(path)))


__all__ = ["verify", "VerifyReport", "LfsPointer", "parse_lfs_pointer", "read_lfs_pointer", "sha256_file",
           "load_manifest", "manifest_path", "describe", "MANIFEST_SUFFIX"]
