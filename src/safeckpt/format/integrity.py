"""BLAKE3 hashes of checkpoint files and of each tensor's bytes, and the manifest that holds them.

Hashing runs on all cores (``blake3(max_threads=AUTO)``) for large inputs.
While a checkpoint is written, `HashingWriter` hashes the bytes on their way
to the file: the whole file, and separately each byte range named in
advance (the safetensors header, each tensor), so that a mismatch found
later can name the tensor whose bytes changed.

The manifest (``manifest.json``) is written last and marks the commit. It is
JSON whose last member is ``"manifest_blake3"``: the hash of every byte of
the file before it, so a change to any byte of the manifest itself is
detected too (even one that leaves the JSON valid and equal in meaning)::

    {
     "format": "safeckpt-checkpoint",
     "schema_version": 1,
     "step": 1200,
     "time": 1732400000.5,
     "metrics": {"val_loss":0.25},
     …,
     "files": {"tensors.safetensors":{"size":4096,"blake3":"…",
               "header":{"range":[0,128],"blake3":"…"},
               "tensors":{"model/weight":{"range":[128,4096],"blake3":"…"}}},
               "state.json":{"size":300,"blake3":"…"}},
     "manifest_blake3": "…"
    }

(each member on one line; wrapped here to fit). The tensors file is hashed range
by range only (``"hashed": "ranges"``): its header and tensors tile it, so every
byte is hashed once while it is written, and its ``"blake3"`` is `root_hash` of
the ranges' hashes.

The hash manifests ``safeckpt verify --write`` puts beside a file are encoded the same
way; `decode_manifest` reads both kinds (a `ManifestKind` says which, and in what words
damage is reported), and `compare_hashes` is the one comparison of a file's hashes with
its entry, wherever they were computed.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import blake3

from ..errors import IntegrityError

HASH = "blake3"
# A file entry with "hashed": RANGES was hashed range by range (see root_hash).
RANGES = "ranges"
MANIFEST_FORMAT = "safeckpt-checkpoint"
MANIFEST_SCHEMA_VERSION = 1
# Inputs smaller than this are hashed on the calling thread: starting the
# worker threads costs more than it saves.
PARALLEL_BYTES = 1 << 20
# The manifest's last member: the hash of every byte before it.
SELF_HASH_KEY = "manifest_blake3"
_SELF_HASH_MARK = b',\n "' + SELF_HASH_KEY.encode() + b'": "'
_SELF_HASH_END = b'"\n}\n'
_HEX_DIGITS = 64


def new_hasher(size_hint: int = PARALLEL_BYTES) -> "blake3.blake3":
    """A BLAKE3 hasher, multi-threaded when `size_hint` bytes are worth it."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO if size_hint >= PARALLEL_BYTES else 1)


def hash_bytes(data) -> str:
    """The hex BLAKE3 digest of a buffer (bytes, numpy array, mmap), on all cores when large.

    >>> hash_bytes(b"abc")[:8]
    '6437b3ac'
    """
    view = memoryview(data).cast("B")
    hasher = new_hasher(view.nbytes)
    hasher.update(view)
    return hasher.hexdigest()


class HashingWriter:
    """A binary file object that writes to `out` and hashes what passes through.

    `ranges` are ``(name, begin, end)`` byte ranges of the stream, sorted and
    not overlapping; each gets its own hash (empty ranges hash nothing). A
    large chunk is hashed on a helper thread while it is being written (BLAKE3
    and file writes both release the GIL), so hashing costs little time.
    The caller must not change a chunk's bytes until the next `write` or
    `hexdigest` (a checkpoint's tensors do not change while they are written).

    >>> with HashingWriter(out, [("header", 0, 128), ("w", 128, 4096)]) as writer:
    ...     write_stream(tensors, writer)
    >>> writer.hexdigest(), writer.range_hashes()[1]
    """

    def __init__(self, out, ranges: Sequence[tuple[str, int, int]] = (), *, whole_file: bool = True) -> None:
        self._out = out
        # without a whole-file hash every byte is hashed once, not twice: the ranges must then
        # tile the stream, and the file's hash is `root_hash` of theirs
        self._file = new_hasher() if whole_file else None
        self._ranges = list(ranges)
        self._hashers = [new_hasher(end - begin) for _, begin, end in self._ranges]
        self._next = 0  # the first range not yet complete
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self.size = 0

    def write(self, data) -> int:
        """Write all of `data` (continuing short writes); returns its length."""
        view = memoryview(data).cast("B")
        self._finish_hashing()
        if view.nbytes >= PARALLEL_BYTES:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="safeckpt-hash")
            self._pending = self._pool.submit(self._hash, view, self.size)
        else:
            self._hash(view, self.size)
        rest = view
        while rest:
            written = self._out.write(rest)
            rest = rest[rest.nbytes if written is None else written:]
        self.size += view.nbytes
        return view.nbytes

    def _hash(self, view: memoryview, start: int) -> None:
        stop = start + view.nbytes
        if self._file is not None:
            self._file.update(view)
        elif not self._ranges or stop > self._ranges[-1][2]:
            raise ValueError("bytes written past the hashed ranges (whole_file=False needs ranges "
                             "that cover the whole stream)")
        index = self._next
        while index < len(self._ranges):
            _, begin, end = self._ranges[index]
            if begin >= stop:
                break
            low, high = max(begin, start), min(end, stop)
            if high > low:
                self._hashers[index].update(view[low - start:high - start])
            if end <= stop:
                index += 1
            else:
                break
        self._next = index

    def _finish_hashing(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def hexdigest(self) -> str:
        """The hash of everything written (`root_hash` of the ranges' without a whole-file hash)."""
        self._finish_hashing()
        return self._file.hexdigest() if self._file is not None else root_hash(self.range_hashes())

    def range_hashes(self) -> list[str]:
        """Each range's hash, in the order of `ranges`."""
        self._finish_hashing()
        return [hasher.hexdigest() for hasher in self._hashers]

    def close(self) -> None:
        """Stop the helper thread (the hashes stay readable)."""
        try:
            self._finish_hashing()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def root_hash(range_hashes: Sequence[str]) -> str:
    """The hash of a file hashed by ranges that tile it: BLAKE3 of their hex digests, one per line."""
    return hash_bytes("\n".join(range_hashes).encode("ascii"))


@dataclass(frozen=True)
class HashCheck:
    """What `compare_hashes` found: whether the header differs, the first damaged tensor."""

    header_changed: bool
    tensor: Optional[str]  # the first tensor, in file order, whose hash differs (hashing stopped there)
    digests: list[str]  # the hashes compared, in file order: all of them when no tensor differs


def compare_hashes(hashes: Iterable[tuple[Optional[str], str]], entry: Mapping[str, Any]) -> HashCheck:
    """Compare ``(name, hash)`` pairs, in file order, with a manifest entry's: the header
    (named None) with ``entry["header"]``, each tensor with ``entry["tensors"][name]``.

    `hashes` is consumed lazily and no further than the first tensor that differs. A header
    that differs does not stop the comparison, so that a damaged tensor can still be named;
    each caller says which of the two it reports first. The file's own hash (`root_hash` of
    ``digests`` for a file hashed by ranges) is the caller's to compare.

    >>> compare_hashes([(None, header), ("w", "0" * 64)], entry).tensor
    'w'
    """
    header_changed, digests = False, []
    for name, digest in hashes:
        if name is None:
            header_changed = digest != entry["header"][HASH]
        elif digest != entry["tensors"][name][HASH]:
            return HashCheck(header_changed, name, digests)
        digests.append(digest)
    return HashCheck(header_changed, None, digests)


# --- the manifest ---------------------------------------------------------------------

def encode_manifest(document: Mapping[str, Any]) -> bytes:
    """The manifest file's bytes: the document as JSON, ending with its own hash."""
    # One top-level member a line, each value compact: readable, and small for 100k tensors.
    members = [f" {json.dumps(key)}: {json.dumps(value, separators=(',', ':'), ensure_ascii=False, allow_nan=False)}"
               for key, value in document.items()]
    prefix = ("{\n" + ",\n".join(members)).encode("utf-8")
    return prefix + _SELF_HASH_MARK + hash_bytes(prefix).encode("ascii") + _SELF_HASH_END


@dataclass(frozen=True)
class ManifestKind:
    """A kind of manifest `decode_manifest` reads: its ``"format"`` and schema version, and
    what the user reads when one is not intact. The templates may name ``{reason}`` (why
    the JSON does not parse), ``{found}`` (the ``"format"`` it has) and ``{expected}``.
    `CHECKPOINT_MANIFEST` is a checkpoint's; `safeckpt.ops.verify.manifest` has the other.

    >>> decode_manifest(raw, "model.safetensors.blake3.json", HASH_MANIFEST)["format"]
    'safeckpt-hashes'
    """

    format: str
    schema_version: int
    incomplete: str  # the closing self-hash is missing or damaged
    changed: str  # the self-hash does not match the bytes before it
    not_json: str  # the self-hash matches, and the JSON does not parse
    not_ours: str  # JSON whose "format" is another


# A training checkpoint's manifest.json (see `safeckpt.format.checkpoint_dir`).
CHECKPOINT_MANIFEST = ManifestKind(
    MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION,
    incomplete="is not a complete safeckpt manifest (its closing self-hash is missing or damaged); the checkpoint "
               "cannot be trusted: restore another step, or move this directory away",
    changed="its bytes differ from what was written (the self-hash does not match); the checkpoint cannot be "
            "trusted: restore another step, or move this directory away",
    not_json="is not valid JSON ({reason}) although its self-hash matches; it was not written by safeckpt: move "
             "this directory away",
    not_ours='is not a safeckpt manifest (no "format": {expected!r}); move this directory away')


def decode_manifest(raw: bytes, path: str, kind: ManifestKind = CHECKPOINT_MANIFEST) -> dict[str, Any]:
    """Parse and check a manifest written by `encode_manifest`: its self-hash, its ``"format"``
    and schema version (those of `kind`); the document without its self-hash.

    Raises IntegrityError naming `path`, in the words of `kind`, when any byte differs from
    what was written, or when the file is not a manifest of that kind.

    >>> decode_manifest(encode_manifest({"format": "safeckpt-checkpoint", "schema_version": 1}), "m.json")
    {'format': 'safeckpt-checkpoint', 'schema_version': 1}
    """
    mark = raw.rfind(_SELF_HASH_MARK)
    digest_end = mark + len(_SELF_HASH_MARK) + _HEX_DIGITS
    if mark < 0 or raw[digest_end:] != _SELF_HASH_END:
        raise IntegrityError(kind.incomplete, path=path)
    recorded = raw[mark + len(_SELF_HASH_MARK):digest_end]
    if hash_bytes(raw[:mark]).encode("ascii") != recorded:
        raise IntegrityError(kind.changed, path=path)
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(kind.not_json.format(reason=exc), path=path) from None
    found = document.get("format") if isinstance(document, dict) else None
    if found != kind.format:
        raise IntegrityError(kind.not_ours.format(found=found, expected=kind.format), path=path)
    check_schema_version(document, kind.schema_version, path)
    document.pop(SELF_HASH_KEY, None)
    return document


def check_schema_version(document: Mapping[str, Any], version: int, path: str) -> None:
    """IntegrityError naming `path` unless the manifest's ``"schema_version"`` is `version`.

    >>> check_schema_version({"schema_version": 2}, 1, "manifest.json")
    Traceback (most recent call last):
    safeckpt.errors.IntegrityError: manifest.json: has schema version 2; this safeckpt reads version 1: ...
    """
    if document.get("schema_version") != version:
        raise IntegrityError(f"has schema version {document.get('schema_version')!r}; this safeckpt reads "
                             f"version {version}: upgrade safeckpt", path=path)


def check_file(data, entry: Mapping[str, Any], path: str) -> None:
    """Compare a file's bytes with its manifest entry; IntegrityError naming the file
    (and the tensor, where the entry records per-tensor ranges) on any difference.
    """
    view = memoryview(data).cast("B")
    if view.nbytes != entry["size"]:
        raise IntegrityError(f"is {view.nbytes} bytes but the manifest records {entry['size']}; the file was "
                             "truncated or extended after the commit: restore another step", path=path)
    if entry.get("hashed") == RANGES:
        _check_by_ranges(view, entry, path)
        return
    if hash_bytes(view) == entry[HASH]:
        return
    _raise_damage(compare_hashes(_range_hashes(view, _recorded_ranges(entry)), entry), path)
    raise IntegrityError(_FILE_DAMAGED, path=path)


_FILE_DAMAGED = "its bytes differ from the manifest's hash; the file is damaged: restore another step"


def _check_by_ranges(view: memoryview, entry: Mapping[str, Any], path: str) -> None:
    """A file hashed by ranges that tile it: each range once (large ones on all cores), the first damaged named."""
    ranges = _recorded_ranges(entry)
    position = 0
    for _, (begin, end) in ranges:
        if begin != position or end < begin:
            raise IntegrityError("the manifest's byte ranges do not tile the file; the manifest is not ours "
                                 "or is damaged: restore another step", path=path)
        position = end
    check = compare_hashes(_range_hashes(view, ranges), entry)
    _raise_damage(check, path)
    if position != view.nbytes or root_hash(check.digests) != entry[HASH]:
        raise IntegrityError(_FILE_DAMAGED, path=path)


def _recorded_ranges(entry: Mapping[str, Any]) -> list[tuple[Optional[str], tuple[int, int]]]:
    """The header (named None, where recorded) and each tensor with its byte range, in file order."""
    ranges = [(None, entry["header"])] if "header" in entry else []
    ranges += entry.get("tensors", {}).items()
    return [(name, tuple(part["range"])) for name, part in sorted(ranges, key=lambda item: tuple(item[1]["range"]))]


def _range_hashes(view: memoryview, ranges: Sequence[tuple[Optional[str], tuple[int, int]]]
                  ) -> Iterator[tuple[Optional[str], str]]:
    """(name, hash) of each range, one at a time; a range past the end of the file matches no hash."""
    for name, (begin, end) in ranges:
        yield name, hash_bytes(view[begin:end]) if end <= view.nbytes else ""


def _raise_damage(check: HashCheck, path: str) -> None:
    """A checkpoint file's first damage, the header's before a tensor's."""
    if check.header_changed:
        raise IntegrityError("the safetensors header's bytes differ from the manifest's hash; the file is "
                             "damaged: restore another step", path=path)
    if check.tensor is not None:
        raise IntegrityError("the tensor's bytes differ from the manifest's hash; the file is damaged: "
                             "restore another step", path=path, tensor=check.tensor)
