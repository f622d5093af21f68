"""open_source: recognise a checkpoint by its content (never its name) and open it.

Formats are told apart by their first bytes (`sniff`), then by what is inside
a container: a zip holding ``<prefix>/data.pkl`` is a PyTorch checkpoint, one
holding ``.npy`` members is an npz, one holding ``config.json``, ``metadata.json``
and ``model.weights.h5`` is a Keras archive; a pickle whose first value is torch's
magic number is a legacy torch file, any other pickle is read as plain data; GGUF
and HDF5 (Keras weights) have their own magic bytes. A TensorFlow checkpoint is
named by its prefix, its ``.index`` (a table with a magic number at its end), a
data shard, its directory or a SavedModel, and is found before anything else.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

from .. import errors
from ..format.storage import open_regular_file
from .base import TensorSource

# Bytes read to recognise a format.
SNIFF_BYTES = 4096
# A directory or index JSON is recognised up to this size.
_JSON_START = (b"{", b"\xef\xbb\xbf{")


def _looks_safetensors(head: bytes) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= 100_000_000 and head[8:9] == b"{"


_PROTOCOL_0_GLOBAL = re.compile(rb"c[A-Za-z_][\w.]*\n[A-Za-z_][\w.]*\n")


def _looks_pickle(head: bytes) -> bool:
    # protocol 2+ starts with PROTO; protocols 0/1 with MARK, EMPTY_DICT/LIST/TUPLE or GLOBAL
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or \
        head[:1] in (b"}", b"]", b"(", b")") or _PROTOCOL_0_GLOBAL.match(head) is not None


def _looks_tar(head: bytes) -> bool:
    return len(head) >= 263 and head[257:262] == b"ustar"


def sniff(head: bytes) -> Optional[str]:
    """The container kind `head` (a file's first bytes) shows, or None."""
    from .gguf_file import is_gguf
    from .hdf5_reader import is_hdf5
    from .npz import is_npy
    from .zip_archive import is_zip
    if _looks_safetensors(head):
        return "safetensors"
    if is_gguf(head):
        return "gguf"
    if is_hdf5(head):
        return "hdf5"
    if is_zip(head):
        return "zip"
    if is_npy(head):
        return "npy"
    if _looks_tar(head):
        return "tar"
    if _looks_pickle(head):
        return "pickle"
    if head.lstrip()[:1] == b"{" or head.startswith(b"\xef\xbb\xbf"):
        return "json"
    return None


def open_source(path: "os.PathLike | str", *, template: Optional[object] = None,
                readings: Optional[dict] = None) -> TensorSource:
    """Open any supported checkpoint for reading; the format comes from the content.

    `path` may be a file, a sharded model's index JSON, or a model folder (its
    index, or its single checkpoint file). `template` reads a raw ``.bin`` dump
    (a JSON template or a safetensors file naming each tensor's dtype and shape).
    Nothing in the file is executed: pickles go through the restricted machine.
    `readings` are the machine's readings of the file's data.pkl from a scan made just
    before (`ops.scan.scan(path, keep=readings)`), so that it is not run twice.

    >>> with open_source("pytorch_model.bin") as src:
    ...     print(src.describe(), src.keys()[:3])
    """
    from .tf_checkpoint import TfCheckpointSource, tf_checkpoint_prefix
    path = os.fspath(path)
    if template is not None:
        from .raw import RawSource
        return RawSource(path, template)
    prefix = tf_checkpoint_prefix(path)  # a prefix is no file, and a data shard has no header of its own
    if prefix is not None:
        return TfCheckpointSource(prefix)
    if os.path.isdir(path):
        return _open_directory(path)
    with open_regular_file(path) as f:  # a FIFO or device is refused unopened
        head = f.read(SNIFF_BYTES)
    kind = sniff(head)
    opener = _OPENERS.get(kind) if kind else None
    if opener is None:
        _refuse(path, head)
    if kind == "zip":
        return _open_zip(path, head, readings)
    return opener(path, head)


# First bytes of common files that are not checkpoints, named when one is refused.
_NOT_CHECKPOINTS = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"%PDF-", "PDF"), (b"\x7fELF", "an ELF executable"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"), (b"7z\xbc\xaf\x27\x1c", "7-Zip"), (b"Rar!\x1a\x07", "RAR"),
)


def _refuse(path: str, head: bytes) -> None:
    from ..format.header import sniff_other_format
    named = next((name for magic, name in _NOT_CHECKPOINTS if head.startswith(magic)), None)
    other = sniff_other_format(head)
    if named is not None:
        detail = f"it starts with {head[:16]!r} ({named})"
    elif other and other[0] not in ("zip", "pickle", "npy", "gguf"):
        detail = other[1]
    else:
        detail = f"it starts with {head[:16]!r}"
    if not head:
        detail = "the file is empty"
    raise errors.UnknownFormatError(
        "not a checkpoint format safeckpt reads (safetensors, PyTorch zip/legacy/tar, Lightning "
        "and SD .ckpt, plain pickles, Paddle .pdparams, npy/npz, GGUF, Keras .keras/.h5, TensorFlow "
        f"checkpoints and SavedModels, sharded index JSON): {detail}",
        path=path)


def _open_safetensors(path: str, head: bytes) -> TensorSource:
    from .safetensors_source import SafetensorsSource
    return SafetensorsSource(path)


def _open_zip(path: str, head: bytes, readings: Optional[dict] = None) -> TensorSource:
    from .keras_file import KerasSource, is_keras_zip
    from .npz import NpzSource
    from .base import map_file, unmap
    from .torch_file import open_torch_zip
    from .zip_archive import ZipArchive
    mapping = map_file(path)
    try:
        names = ZipArchive(mapping, path).names()
    finally:
        unmap(mapping)
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return open_torch_zip(path, readings)
    if names and all(n.endswith(".npy") for n in names):
        return NpzSource(path)
    if is_keras_zip(names):
        return KerasSource(path)
    raise errors.UnknownFormatError(
        "a zip archive that is neither a PyTorch checkpoint (no data.pkl), an npz nor a Keras archive "
        f"(members: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})", path=path)


def _open_npy(path: str, head: bytes) -> TensorSource:
    from .npz import NpySource
    return NpySource(path)


def _open_tar(path: str, head: bytes) -> TensorSource:
    from .torch_file import open_torch_tar
    from .torch_legacy import is_legacy_tar
    if not is_legacy_tar(head):
        raise errors.UnknownFormatError("a tar archive that is not a legacy PyTorch checkpoint "
                                        "(no sys_info/pickle/storages/tensors members)", path=path)
    return open_torch_tar(path)


def _open_pickle(path: str, head: bytes) -> TensorSource:
    from .torch_file import open_pickle, open_torch_legacy
    from .torch_legacy import is_legacy
    if is_legacy(head):
        return open_torch_legacy(path)
    return open_pickle(path)


def _open_gguf(path: str, head: bytes) -> TensorSource:
    from .gguf_file import GgufSource
    return GgufSource(path)


def _open_hdf5(path: str, head: bytes) -> TensorSource:
    from .keras_file import KerasSource
    return KerasSource(path)


def _open_json(path: str, head: bytes) -> TensorSource:
    from .sharded import ShardedSource
    return ShardedSource(path, open_source)


_OPENERS: dict[str, Callable[[str, bytes], TensorSource]] = {
    "safetensors": _open_safetensors, "zip": _open_zip, "npy": _open_npy, "tar": _open_tar,
    "pickle": _open_pickle, "json": _open_json, "gguf": _open_gguf, "hdf5": _open_hdf5,
}

# Names a model folder's single checkpoint usually has, most preferred first.
# tensors.safetensors: a training checkpoint directory (CheckpointManager's step, SafeCheckpointIO's *.ckpt/).
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "model.ckpt",
                "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "tensors.safetensors")


def _open_directory(path: str) -> TensorSource:
    from .dcp_dir import DcpSource, is_dcp_directory
    from .dcp_torch import TorchDcpSource, is_torch_dcp_directory
    from .sharded import ShardedSource, find_index
    if is_dcp_directory(path):
        return DcpSource(path)
    if is_torch_dcp_directory(path):
        return TorchDcpSource(path)
    index = find_index(path)
    if index is not None:
        return ShardedSource(index, open_source)
    for name in _MODEL_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return open_source(candidate)
    raise errors.UnknownFormatError(
        "a folder with no sharded-checkpoint index (*.index.json) and no model file "
        f"({', '.join(_MODEL_FILES[:3])}, ...): name the file to open", path=path)
