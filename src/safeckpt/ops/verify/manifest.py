"""The BLAKE3 manifest of a file or sharded model: where it goes, how it is read and written.

``safeckpt verify --write`` records BLAKE3 hashes in a manifest beside PATH:

- a file ``model.safetensors`` -> ``model.safetensors.blake3.json``;
- a sharded model whose index is ``model.safetensors.index.json`` ->
  ``model.safetensors.index.json.blake3.json`` beside it, covering the index and each
  shard it names.

(A training checkpoint has its ``manifest.json`` already, written by each save: see
`safeckpt.format.checkpoint_dir`.) Manifests are JSON as `safeckpt.format.integrity.encode_manifest`
writes it: one member a line, ending with the hash of every byte before it, so an edited
manifest is detected (`safeckpt.format.integrity.decode_manifest` reads both kinds: any byte
that differs from what safeckpt wrote shows)::

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
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Mapping, Optional

from ... import errors
from ...format.storage import open_regular_file
from ...format.atomic import atomic_output, write_all
from ...sources.sharded import find_index
from ...format.integrity import HASH, RANGES, ManifestKind, decode_manifest, encode_manifest

MANIFEST_SUFFIX = ".blake3.json"
MANIFEST_FORMAT = "safeckpt-hashes"
MANIFEST_SCHEMA_VERSION = 1
# A manifest of a million tensors is ~200 MB; anything larger is not one of ours.
MAX_MANIFEST_BYTES = 512 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_EDITED = ("its bytes differ from what safeckpt wrote (its self-hash does not match): the manifest was edited or "
           "damaged; write it again with `safeckpt verify --write` from a copy you trust")
# What `decode_manifest` says of a manifest beside a file: any damage is an edit, whatever byte changed.
HASH_MANIFEST = ManifestKind(MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION, incomplete=_EDITED, changed=_EDITED,
                             not_json=_EDITED,
                             not_ours="is not a safeckpt hash manifest (its format is {found!r}, not {expected!r})")


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


def load_manifest(path: "os.PathLike | str") -> Optional[dict]:
    """The checked manifest at `path`, or None if there is none.

    IntegrityError when any byte differs from what safeckpt wrote (the manifest encodes
    its own hash) or when it is not a manifest of ours.

    >>> load_manifest("model.safetensors.blake3.json")["files"]["model.safetensors"]["size"]
    4224
    """
    path = os.fspath(path)
    try:
        with open_regular_file(path) as file:
            raw = file.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise errors.IntegrityError(f"is larger than {MAX_MANIFEST_BYTES:,} bytes: not a safeckpt manifest",
                                    path=path)
    document = decode_manifest(raw, path, HASH_MANIFEST)
    _check_files(document, path)
    return document


def write_manifest(path: str, entries: Mapping[str, dict]) -> None:
    """Write the manifest of the files `entries` (name -> entry) at `path`, atomically.

    >>> write_manifest("model.safetensors.blake3.json", {"model.safetensors": entry})
    """
    from ..._version import __version__
    document = {"format": MANIFEST_FORMAT, "schema_version": MANIFEST_SCHEMA_VERSION, "hash": HASH,
                "written_by": f"safeckpt {__version__}", "time": time.time(), "files": dict(entries)}
    try:
        raw = encode_manifest(document)
    except UnicodeEncodeError:
        raise errors.SafeckptError("a tensor or file name is not valid Unicode: it cannot be recorded in a "
                                   "JSON manifest", path=path) from None
    with atomic_output(path) as fd:
        write_all(fd, memoryview(raw))


def entry_ok(entry: Mapping[str, Any]) -> bool:
    """A file entry has what checking it reads: a size, a hash, and hashes for its header and tensors.

    >>> entry_ok({"size": 4, "blake3": "0" * 64})
    True
    """
    tensors = entry.get("tensors", {})
    if not _is_size(entry.get("size")) or not _is_hex(entry.get(HASH)) or not isinstance(tensors, dict):
        return False
    parts = list(tensors.values())
    if entry.get("hashed") == RANGES:
        parts.append(entry.get("header"))
    return all(isinstance(part, dict) and _is_hex(part.get(HASH)) for part in parts)


def _check_files(document: dict, path: str) -> None:
    """The manifest's files: what reading it relies on, with a clear error for anything else."""
    def malformed(detail: str) -> errors.IntegrityError:
        return errors.IntegrityError(f"is not a safeckpt hash manifest ({detail})", path=path)

    files = document.get("files")
    if not isinstance(files, dict) or not files:
        raise malformed("no files")
    for name, entry in files.items():
        pieces = name.split("/")
        if not name or name.startswith("/") or "\\" in name or ".." in pieces or "" in pieces:
            raise malformed(f"file name {name!r} leaves the manifest's folder")
        if not isinstance(entry, dict) or not entry_ok(entry):
            raise malformed(f"the entry of {name!r} lacks a size, or a hash of the file, its header or a tensor")


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


__all__ = ["manifest_path", "load_manifest", "write_manifest", "entry_ok", "HASH_MANIFEST", "MANIFEST_SUFFIX",
           "MANIFEST_FORMAT", "MANIFEST_SCHEMA_VERSION", "MAX_MANIFEST_BYTES"]
