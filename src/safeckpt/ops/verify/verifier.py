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

How
---
Each file's structure is checked as `safeckpt.ops.verify.file_checks` says, then its hashes
are compared with the manifest beside PATH (`safeckpt.ops.verify.manifest` says where it is
and what it records), or written there with ``write=True``. A training checkpoint has
its ``manifest.json`` already (written by each save; `safeckpt.format.checkpoint_dir` says
what the directory holds, `safeckpt.format.integrity` how a manifest is encoded): it
is checked, never written here. Hashing runs on all cores in bounded memory
(`safeckpt.ops.verify.range_hash`).

A structural error ends the check of that file. With a manifest: files it records that
are gone, files it does not record, then per file its size, its tensors' names, and the
hashes in file order; the first damaged tensor is named, with its file. Without one the
structure is all there is to check (``VerifyReport.hashes == "missing"``).

``sha256=True`` adds each file's sha256: the oid the Hub shows for an LFS file.
``lfs_pointer=FILE`` compares the file's size and sha256 with a Git LFS pointer (see
`safeckpt.ops.verify.lfs`).

`VerifyReport.exit_code`: 0 intact, 1 invalid, damaged or different, 2 unreadable.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ... import errors
from ...format import integrity
from ...format.checkpoint_dir import (MANIFEST_FILE, STATE_FILE, TENSORS_FILE, inspect_directory, missing_file,
                                      step_from_name)
from ...format.integrity import RANGES
from ...format.storage import check_regular, open_regular_file
from ...sources.base import mapped
from ...sources.dcp_dir import DCP_FILE, DCP_FORMAT
from ...sources import open_source
from ...sources.detect import sniff
from ...sources.sharded import ShardedSource, find_index
from .lfs import LfsPointer, Sha256Jobs, read_lfs_pointer
from .manifest import MANIFEST_SUFFIX, MAX_MANIFEST_BYTES, entry_ok, load_manifest, write_manifest
from .range_hash import Meter, Progress
from .file_checks import check_entry, check_ranges, file_entry, open_layout, read_head

# Files looked at in a plain folder.
MAX_DIRECTORY_FILES = 100_000

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
        status = "error" if isinstance(exc, OSError) else "invalid"  # OSError: a FIFO or device, not read
        return status, str(exc) if exc.path is not None else f"{path}: {exc}"
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
    meter = Meter(progress)
    options = _Options(write, sha256, pointer, meter)
    report = _verify_path(path, options)
    report.hashed_bytes = meter.done
    report.seconds = time.perf_counter() - started
    return report


# --- dispatch -------------------------------------------------------------------------

@dataclass
class _Options:
    write: bool
    sha256: bool
    pointer: Optional[LfsPointer]
    meter: Meter


def _verify_path(path: str, options: _Options) -> VerifyReport:
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            return _verify_directory(path, options)
        check_regular(path, mode)
        head = read_head(path)
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
    names = os.listdir(path)
    if MANIFEST_FILE in names and (step_from_name(os.path.basename(os.path.normpath(path))) is not None
                                   or TENSORS_FILE in names or STATE_FILE in names or DCP_FILE in names):
        return _verify_checkpoint(path, None, options)
    if any(step_from_name(name) is not None and os.path.isdir(os.path.join(path, name)) for name in names):
        return _verify_manager_directory(path, options)
    index = find_index(path)
    if index is not None:
        return _verify_sharded(path, index, options)
    return _verify_loose(path, options)


def _verify_loose(path: str, options: _Options) -> VerifyReport:
    """Each checkpoint file under a folder (by content; our manifests and JSON are skipped), on its own,
    and each checkpoint directory under it (Lightning's ``epoch=3-step=120.ckpt/``) as a whole."""
    report = VerifyReport(path, "directory", hashes="unchecked")
    found: list[str] = []
    checkpoints: list[str] = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        if root != path and MANIFEST_FILE in files and (TENSORS_FILE in files or STATE_FILE in files
                                                        or DCP_FILE in files):
            checkpoints.append(root)
            dirs[:] = []
            continue
        for name in sorted(files):
            candidate = os.path.join(root, name)
            if len(found) >= MAX_DIRECTORY_FILES:
                report.notes.append(f"more than {MAX_DIRECTORY_FILES} checkpoint files: the rest were not checked")
                break
            if _is_checkpoint_file(candidate):
                found.append(candidate)
    if not found and not checkpoints:
        report.add_problem("error", f"{path}: no *.safetensors files (nor files of another format safeckpt "
                                    "reads) in this directory", "NotFound", path)
        return report
    checkpoint_bytes = sum(_size(os.path.join(c, name)) or 0 for c in checkpoints for name in os.listdir(c))
    options.meter.plan(checkpoint_bytes * (1 + int(options.sha256)) + sum(
        (_size(p) or 0) * (int(options.write or os.path.exists(p + MANIFEST_SUFFIX)) + int(options.sha256))
        for p in found))
    children = [(candidate, _verify_path(candidate, options)) for candidate in found]
    children += [(directory, _verify_checkpoint(directory, None, options)) for directory in checkpoints]
    report.children = [child for _, child in sorted(children, key=lambda item: item[0])]
    return report


def _is_checkpoint_file(path: str) -> bool:
    if path.endswith(MANIFEST_SUFFIX):
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # fifos and devices: reading them could block forever
        if path.endswith(".safetensors"):
            return True
        return sniff(read_head(path)) in ("safetensors", "zip", "npy", "tar", "pickle")
    except OSError:
        return path.endswith(".safetensors")  # unreadable: its report says so


# --- files and sharded models -----------------------------------------------------------

def _verify_sharded(path: str, index: str, options: _Options) -> VerifyReport:
    report = VerifyReport(path, "sharded")
    try:
        with open_source(index) as source:  # checks the index against every shard it names
            # the shards by the names the index gives them, as the manifest records them
            shards = sorted(source.shards) if isinstance(source, ShardedSource) else []
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
    with Sha256Jobs(paths.values() if options.sha256 or options.pointer else (), options.meter) as jobs:
        if options.pointer is not None:
            _compare_pointer_size(report, first, _size(first), options.pointer)
        tensors = parameters = 0
        for name, path in paths.items():
            try:
                with open_layout(path, is_index=name == index) as layout:
                    tensors += len(layout.tensors)
                    parameters += layout.parameters
                    report.format = report.format or layout.format
                    if options.write:
                        entries[name] = file_entry(layout, options.meter)
                    elif recorded is not None and name in recorded["files"]:
                        check_entry(layout, recorded["files"][name], options.meter, _PLAIN_ADVICE)
            except errors.IntegrityError as exc:
                damaged = True
                report.fail(exc, path)
            except (errors.SafeckptError, OSError) as exc:
                structure_failed = True
                report.fail(exc, path)
        if report.kind == "file":
            report.tensors, report.parameters = tensors, parameters
        report.sha256 = _sha256_results(jobs, report)
    if options.pointer is not None:
        _compare_pointer_oid(report, first, options.pointer)
    if options.write:
        if report.status == "ok":
            write_manifest(manifest, entries)
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


# --- training checkpoints -------------------------------------------------------------------

def _verify_manager_directory(path: str, options: _Options) -> VerifyReport:
    """Every committed step of a CheckpointManager directory (listed as the manager lists them)."""
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
                             manifest=os.path.join(shown, MANIFEST_FILE))
        child.fail(damaged.error, shown)
        children.append((damaged.step, child))
    report.children = [child for _, child in sorted(children, key=lambda item: (item[0], item[1].path))]
    if not report.children:
        report.add_problem("error", f"{path}: no committed checkpoint in this CheckpointManager directory",
                           "NotFound", path)
    return report


def _verify_checkpoint(path: str, manifest: Optional[dict], options: _Options) -> VerifyReport:
    """One step directory: its manifest.json (decoded by `integrity`), then each file it records."""
    manifest_file = os.path.join(path, MANIFEST_FILE)
    report = VerifyReport(path, "checkpoint", format="safeckpt-checkpoint", manifest=manifest_file)
    if options.write:
        report.notes.append("CheckpointManager writes a step's manifest.json when it saves it; --write leaves "
                            "it as it is")
    try:
        if manifest is None:
            with open_regular_file(manifest_file) as file:
                manifest = integrity.decode_manifest(file.read(MAX_MANIFEST_BYTES + 1), manifest_file)
        files = manifest.get("files")
        if not isinstance(files, dict) or not isinstance(files.get(TENSORS_FILE, files.get(DCP_FILE)), dict):
            raise errors.IntegrityError(f"records no {TENSORS_FILE} (nor a distributed checkpoint's {DCP_FILE}): "
                                        "move this directory away", path=manifest_file)
        if DCP_FILE in files:
            report.format = DCP_FORMAT
        names = [name for name in files if "/" not in name and "\\" not in name and name not in ("", ".", "..")]
        if not all(isinstance(files[name], dict) and entry_ok(files[name]) for name in names):
            raise errors.IntegrityError("lacks what a manifest records (a size and hash for each file): move this "
                                        "directory away", path=manifest_file)
        extra = sorted(set(os.listdir(path)) - set(names) - {MANIFEST_FILE})
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
    with Sha256Jobs([p for p in paths if os.path.isfile(p)] if options.sha256 else (), options.meter) as jobs:
        for name, file_path in zip(names, paths):
            try:
                _check_checkpoint_file(report, name, file_path, files[name], options.meter)
            except FileNotFoundError:
                report.missing.append(file_path)
                report.hashes = "failed"
                report.fail(missing_file(file_path), file_path)
            except (errors.SafeckptError, OSError) as exc:
                report.hashes = "failed"
                report.fail(exc, file_path)
        report.sha256 = _sha256_results(jobs, report)
    return report


def _check_checkpoint_file(report: VerifyReport, name: str, path: str, entry: dict, meter: Meter) -> None:
    if name != TENSORS_FILE or entry.get("hashed") != RANGES:
        with mapped(path) as data:
            size = len(data)
            integrity.check_file(data, entry, path)
        meter.tick(size, path)
        return
    with open_layout(path) as layout:  # the strict reader: the structure, then the ranges
        report.tensors, report.parameters = len(layout.tensors), layout.parameters
        check_ranges(layout, entry, meter, _CHECKPOINT_ADVICE)


# --- small helpers -----------------------------------------------------------------------

def _named(pointer: LfsPointer) -> str:
    return f" {pointer.path}" if pointer.path else ""


def _size(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _shown(directory: str, path: str) -> str:
    """A step's path as the user named its directory (the manager lists absolute paths)."""
    return os.path.join(directory, os.path.basename(os.path.normpath(path)))


__all__ = ["verify", "VerifyReport", "describe"]


def _sha256_results(jobs: Sha256Jobs, report: VerifyReport) -> dict[str, str]:
    """The sha256 jobs' digests; a file they could not read is a problem of `report`, unless its
    own check has already said what is wrong."""
    digests, failures = jobs.results()
    for path, exc in failures.items():
        if report.status == "ok":
            report.fail(exc, path)
    return digests
