"""convert: any checkpoint we read -> safetensors, streamed one tensor at a time.

The steps, in order:

1. open the source and scan every file it reads (each shard of a sharded
   checkpoint); a malicious one is refused before anything is written (unless
   `allow_unsafe_structure`; nothing in it is executed either way);
2. choose the tensors: `extract` a sub-tree (Lightning / Stable Diffusion
   ``state_dict``), swap in or drop the SD EMA weights, apply `select` /
   `exclude` globs; tied tensors (the source's aliases, or names whose arrays
   are the same bytes of the same storage) are written once, under the first
   name in the source's state-dict order (the name transformers keeps: the
   embedding, not the head), the dropped name recorded in metadata as
   ``dropped -> kept`` like ``safetensors.torch.save_model``; when the model's
   ``config.json`` lies beside the input and says transformers will not tie
   them again on load, every name is written (`layout.dropped_ties`);
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
   (or its cast); then every output is committed (fsync, rename), the index last;
7. a model folder converted into a folder gets its other files as they are
   (config.json, generation_config.json, tokenizer files, README): each copied
   atomically, never a weight file or anything that reads as a pickle.

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

import hashlib
import json
import math
import mmap
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .. import errors
from .._version import __version__
from ..format import writer
from ..format.dtypes import DTYPES
from ..format.storage import open_regular_file
from ..sources.base import TensorInfo, TensorSource
from ..sources.dcp_dir import is_dcp_directory
from . import cast as casting
from .destination import check_destination
from .scan.guard import check_safety, open_checked
from .layout import dropped_ties, tie_groups, transformers_ties
from .selection import Choice, choose_tensors, first_items, matches, name_globs, tied_names
from ..sinks.safetensors import OutputTensor, destination, parse_size, write_safetensors

# --- limits and names --------------------------------------------------------------

# The non-tensor tree is stored in every output's header; a checkpoint with a huge
# structure (millions of optimizer scalars) must not push the header towards the
# format's 100 MB limit, so larger trees are cut (biggest parts first) and the cut noted.
MAX_TREE_JSON_BYTES = 16 * 1024 * 1024
# Bytes hashed between two checks for cancellation (and page drops).
HASH_BLOCK_BYTES = 8 * 1024 * 1024

HASH_KEY = "safeckpt.source_sha256"
HASH_PLACEHOLDER = "0" * 64  # a sha256 hex digest has exactly this length

CONFIG_NAME = "config.json"
# A model's config.json is a few KiB (a few hundred for composite models); more is not one.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Files of a model folder that hold weights (the ones converted, or another framework's)
# are never copied beside the output: a pickle would carry code into a folder of safe files.
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".safetensors", ".index.json", ".h5",
                   ".msgpack", ".npy", ".npz", ".gguf", ".onnx", ".pdparams", ".joblib")
# Containers a file is recognised as by its first bytes that hold tensors or code, whatever its name.
WEIGHT_CONTAINERS = frozenset({"safetensors", "zip", "npy", "tar", "pickle"})
# Of those, the pickle-based ones: beside a model, a training run's state (optimizer.pt, rng_state.pth).
STATE_CONTAINERS = frozenset({"zip", "tar", "pickle"})
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
    underflow: dict[str, int]  # tensor -> non-zero values that became ±0 in the cast
    verified: bool
    seconds: float
    scan_verdict: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # a model folder's other files, copied beside the outputs

    def to_dict(self) -> dict:
        return asdict(self)


# --- public API ----------------------------------------------------------------------

def convert(src: "os.PathLike | str | TensorSource", dst: "os.PathLike | str", *,
            shard_size: "int | str | None" = None, dtype: Optional[str] = None,
            select: "Sequence[str] | str | None" = None, exclude: "Sequence[str] | str | None" = None,
            extract: Optional[str] = "auto", ema: Optional[str] = None, verify: bool = False,
            allow_unsafe_structure: bool = False, metadata: Optional[dict[str, str]] = None,
            source_hash: bool = True, progress: Optional[Callable[[int, int, str], None]] = None,
            cast_select: "Sequence[str] | str | None" = None,
            cast_exclude: "Sequence[str] | str | None" = None, overwrite: bool = False) -> ConvertReport:
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
    `cast_select` / `cast_exclude` are globs on the output names choosing which
    floating tensors `dtype` applies to (all of them by default; see ``safeckpt cast``).
    An output that is one of the inputs is refused (`OutputIsInputError`), and one
    that exists is replaced only with `overwrite` (else `OutputExistsError`), both
    before anything is read.

    Tied weights are written once, under the name transformers keeps; with the
    model's config.json beside `src`, names transformers would not tie again on
    load are each written. A model folder converted into a folder
    (``convert("hf_model/", "out/")``) gets the folder's other files too
    (config.json, tokenizer files, README; never weights or pickles), listed in
    `copied`; one that exists at `dst` is replaced only with `overwrite`.

    >>> report = convert("pytorch_model.bin", "model.safetensors", dtype="bf16", verify=True)
    >>> report.tensors, report.outputs
    (291, ['model.safetensors'])
    """
    started = time.perf_counter()
    target = casting.target_dtype(dtype) if dtype is not None else None
    if shard_size is not None:
        parse_size(shard_size)  # a bad size is refused before anything is read
    select, exclude = name_globs(select, "select"), name_globs(exclude, "exclude")
    cast_select, cast_exclude = name_globs(cast_select, "cast_select"), name_globs(cast_exclude, "cast_exclude")
    if ema not in (None, "drop", "only"):
        raise errors.SafeckptError(f"ema must be None, 'drop' or 'only', not {ema!r}")
    user_metadata = writer.check_metadata(metadata, dst)
    check_destination([src], dst, overwrite=overwrite, sharded=shard_size is not None)
    copies, run_notes = _folder_files(src, dst, overwrite)

    source_path = src.path if isinstance(src, TensorSource) else os.fspath(src)
    # the sha256 is the slowest part of a conversion: start it before anything else
    early_hash = _SourceHash(source_path) if source_hash and os.path.isfile(source_path) else None
    try:
        source = src if isinstance(src, TensorSource) else open_checked(source_path, allow_unsafe_structure)
    except BaseException:
        if early_hash is not None:
            early_hash.cancel()
        raise
    hasher: Optional[_SourceHash] = None
    try:
        scan_report = check_safety(source.files(), allow_unsafe_structure)
        choice = choose_tensors(source, extract=extract, ema=ema, select=select, exclude=exclude)
        aliases = _dropped_ties(source, choice, run_notes)
        plans = _plan_tensors(source, choice, aliases, target, dst, cast_select, cast_exclude)
        hashed = source_hash and os.path.isfile(source.path)
        if source_hash and not hashed:
            run_notes.append(f"no source sha256: {source.path} is not a regular file")
        meta = _metadata(source, choice, target, ema, user_metadata, aliases, hashed, run_notes)
        if early_hash is not None and (not hashed or source.path != source_path):
            early_hash.cancel()
        hasher = (early_hash if early_hash is not None and hashed and source.path == source_path
                  else _SourceHash(source.path) if hashed else None)
        early_hash = None
        outputs = _Outputs(source)
        written = write_safetensors(
            [outputs.tensor(plan) for plan in plans], dst, metadata=meta, shard_size=shard_size,
            verify=verify, progress=progress,
            finish_metadata=(lambda m: dict(m, **{HASH_KEY: _digest(hasher, source.path)})) if hashed else None,
            copies=copies)
    except BaseException:
        for pending_hash in (early_hash, hasher):
            if pending_hash is not None:
                pending_hash.cancel()
        raise
    finally:
        if not isinstance(src, TensorSource):
            source.close()

    notes = list(source.notes) + choice.notes + run_notes  # what reading left out comes first
    if scan_report is not None and scan_report.verdict != "safe":
        notes.insert(0, f"the scan found the source {scan_report.verdict} ({len(scan_report.findings)} "
                        "findings); nothing in it was executed")
    if outputs.overflow:
        total = sum(outputs.overflow.values())
        warnings.warn(f"{source_path}: {total} finite values in {len(outputs.overflow)} tensors overflowed "
                      f"when cast to {target} (they are now ±inf, or ±max for F8_E4M3): "
                      f"{first_items(outputs.overflow)}", RuntimeWarning, stacklevel=2)
    return ConvertReport(
        source=source_path, source_format=source.format, outputs=written.outputs, index=written.index,
        tensors=len(plans), bytes_written=written.bytes_written, aliases=dict(aliases),
        skipped=choice.skipped, cast=target, overflow=dict(outputs.overflow),
        underflow=dict(outputs.underflow), verified=bool(verify),
        seconds=time.perf_counter() - started,
        scan_verdict=scan_report.verdict if scan_report is not None else None, notes=notes,
        copied=written.copied)


def cast(src: "os.PathLike | str", dst: "os.PathLike | str", dtype: str, *,
         select: "Sequence[str] | str | None" = None, exclude: "Sequence[str] | str | None" = None,
         shard_size: "int | str | None" = None, verify: bool = False, allow_unsafe_structure: bool = False,
         progress: Optional[Callable[[int, int, str], None]] = None, overwrite: bool = False,
         **convert_options: Any):
    """Write `src` (any format safeckpt reads) as safetensors with its floating tensors cast to `dtype`.

    `select` / `exclude` are globs on tensor names choosing which floating tensors
    are cast; every other tensor (integers, bools, and those left out) is written
    unchanged. Returns convert's `ConvertReport`, whose ``overflow`` and
    ``underflow`` map each tensor to its count of values that became ±inf (±max for
    F8_E4M3) or ±0. `dst` is never one of the inputs, and an existing `dst` is
    replaced only with `overwrite`. Other keyword arguments go to `convert`.

    >>> report = cast("model.safetensors", "model-bf16.safetensors", "bf16", exclude="*norm*")
    >>> report.overflow
    {}
    """
    return convert(src, dst, dtype=dtype, cast_select=select, cast_exclude=exclude, shard_size=shard_size,
                   verify=verify, allow_unsafe_structure=allow_unsafe_structure, progress=progress,
                   overwrite=overwrite, **convert_options)


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
                  dst, cast_select: Sequence[str] = (), cast_exclude: Sequence[str] = ()) -> list[_Plan]:
    plans = []
    for out, name in choice.names.items():
        if out in aliases:
            continue
        writer.check_name(out, dst)
        info = source.infos[name]
        cast = (target is not None and casting.is_floating(info.dtype)
                and matches(out, cast_select, cast_exclude))
        dtype = target if cast else info.dtype
        nbytes = info.nbytes if dtype == info.dtype else _nbytes(dtype, info.shape)
        plans.append(_Plan(out, name, info, dtype, nbytes))
    return plans


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * DTYPES[dtype].bits // 8


def _dropped_ties(source: TensorSource, choice: Choice, notes: list[str]) -> dict[str, str]:
    """Dropped -> kept output names for the tied tensors (see `layout.dropped_ties`)."""
    groups = tie_groups(tied_names(source, choice).items(), choice.names)
    config = _model_config(source, notes) if groups else None
    if config is not None and not transformers_ties(config):
        notes.append(f"{len(groups)} groups of names share storage, but {CONFIG_NAME} says transformers does "
                     "not tie them on load (tie_word_embeddings), so every name is written: "
                     f"{first_items(name for names in groups for name in names)}")
    return dropped_ties(groups, config)


def _model_config(source: TensorSource, notes: list[str]) -> Optional[dict]:
    """The config.json in the source's folder, or None (noted when it cannot be read as one)."""
    path = os.path.join(os.path.dirname(os.path.abspath(source.path)), CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open_regular_file(path) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        config = json.loads(raw) if len(raw) <= MAX_CONFIG_BYTES else None
    except (OSError, ValueError, errors.SafeckptError):  # a UnicodeDecodeError is a ValueError
        config = None
    if not isinstance(config, dict):
        notes.append(f"{path} is not a JSON object of at most {MAX_CONFIG_BYTES} bytes; tied names were "
                     "chosen without it")
        return None
    return config


# --- the model folder's other files ------------------------------------------------------

def _folder_files(src: "os.PathLike | str | TensorSource", dst: "os.PathLike | str",
                  overwrite: bool) -> tuple[list[str], list[str]]:
    """The files to copy beside the output (and notes): when a model folder is converted into
    a folder, each of its top-level files that holds no weights. One that exists at the
    output (and is not that same file) is refused unless `overwrite`, before anything is read."""
    if isinstance(src, TensorSource) or not os.path.isdir(src):
        return [], []
    folder = os.fspath(src)
    if is_dcp_directory(folder):
        return [], []  # a distributed checkpoint's files are its layout and manifest: nothing to copy
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
    kept = [name for name in names if not _holds_weights(os.path.join(folder, name))]
    if not kept:
        return [], []
    dest = destination(dst)
    if dest.directory != os.fspath(dst):
        return [], [(f"{len(kept)} files of the model folder ({first_items(kept)}) were not copied: the output "
                     "is a file; convert into a folder to copy them")]
    copies = []
    for name in kept:
        path, target = os.path.join(folder, name), os.path.join(dest.directory, name)
        if os.path.exists(target):
            if os.path.samefile(path, target):
                continue  # converted in place: the file is already there
            if not overwrite:
                raise errors.OutputExistsError(
                    "already exists; nothing was read or written. Replace it with overwrite=True (--force), or "
                    "choose another output", path=target)
        copies.append(path)
    return copies, []


def _holds_weights(path: str) -> bool:
    """True for a file named like weights or whose first bytes are a tensor container or a pickle."""
    if path.lower().endswith(WEIGHT_SUFFIXES):
        return True
    kind = sniffed(path)
    return kind is None or kind in WEIGHT_CONTAINERS  # a FIFO or an unreadable file is not copied either


def sniffed(path: str) -> Optional[str]:
    """The container kind a regular file's first bytes show ("" for none); None when it cannot be read."""
    from ..sources.detect import SNIFF_BYTES, sniff  # at call time: detect grows with every format

    try:
        with open_regular_file(path) as f:
            return sniff(f.read(SNIFF_BYTES)) or ""
    except (OSError, errors.SafeckptError):
        return None


def model_files_of(folder: "os.PathLike | str") -> set[str]:
    """The files of the model a folder holds (its index and shards, or its one model file); empty for none."""
    from ..sources import open_source  # at call time, as detect: it grows with every format

    try:
        with open_source(folder) as source:
            return {os.path.abspath(path) for path in source.files()}
    except errors.SafeckptError:
        return set()


def state_files(folder: "os.PathLike | str", model_files: Optional[set[str]] = None) -> list[str]:
    """Names of a folder's top-level files that are pickles (torch zips, legacy files, plain pickles) and not
    its model: a training checkpoint's optimizer, scheduler and RNG states (`safeckpt.torch.folders`)."""
    folder = os.fspath(folder)
    model = model_files_of(folder) if model_files is None else model_files
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False))
    return [name for name in names
            if os.path.abspath(os.path.join(folder, name)) not in model and sniffed(os.path.join(folder, name)) in STATE_CONTAINERS]


# --- metadata ----------------------------------------------------------------------

def _metadata(source: TensorSource, choice: Choice, target: Optional[str], ema: Optional[str],
              user: Optional[dict[str, str]], aliases: dict[str, str], source_hash: bool,
              notes: list[str]) -> dict[str, str]:

    meta: dict[str, str] = dict(source.metadata or {})
    meta.setdefault("format", "pt")
    meta["safeckpt.version"] = __version__
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
            with open_regular_file(self.path) as file:
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


# --- the tensors written --------------------------------------------------------------

class _Outputs:
    """Each plan as the sink's OutputTensor: read from the source, cast in blocks if asked."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.overflow: dict[str, int] = {}  # output name -> values that overflowed in the cast
        self.underflow: dict[str, int] = {}  # output name -> non-zero values that became zero

    def tensor(self, plan: _Plan) -> OutputTensor:
        span = None if plan.cast else self.source.file_span(plan.source)
        in_file = (span.path, span.offset) if span is not None and span.nbytes == plan.nbytes else None
        return OutputTensor(plan.name, plan.dtype, tuple(plan.info.shape), lambda: self._bytes(plan),
                            span=in_file, done=lambda: self.source.release(plan.source))

    def _bytes(self, plan: _Plan) -> Iterator[memoryview]:
        """The bytes the file holds for `plan`, in order: cast in blocks if asked."""
        array = self.source.read_checked(plan.source)
        if plan.cast:
            overflow = underflow = 0
            for block in casting.cast_blocks(array, plan.dtype):
                overflow += block.overflow
                underflow += block.underflow
                yield memoryview(block.values.view(np.uint8))
            if overflow:
                self.overflow[plan.name] = overflow
            if underflow:
                self.underflow[plan.name] = underflow
            return
        value = writer.RawTensor(plan.info.dtype, tuple(plan.info.shape), array) \
            if DTYPES[plan.info.dtype].numpy is None else array
        yield from writer.tensor_chunks(value)


def _digest(hasher: "_SourceHash", path: str) -> str:
    digest = hasher.result()
    if digest is None:
        raise errors.SourceError(f"cannot hash the source: {hasher.error}; pass source_hash=False to convert "
                                 "without its sha256", path=path)
    return digest


# --- helpers -----------------------------------------------------------------------



__all__ = ["convert", "ConvertReport", "Choice", "choose_tensors", "parse_size", "MAX_TREE_JSON_BYTES"]
