"""The check before an op writes: never over one of its inputs, never over a file by surprise.

convert, cast and merge call `check_destination` before they read anything.
Files are compared by identity (device and inode), not by spelling, so a
symlink, a hard link or ``a/../a`` naming an input is caught. An input is every
file it is read from: a sharded checkpoint's index and shards, a model
folder's files. An output that exists and is not an input is replaced only
with ``overwrite=True`` (``--force``); writing safetensors under a pickle
format's extension is allowed but warned about, since the name then lies.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Iterable, Iterator, Sequence

from .. import errors
from ..sources.base import TensorSource
from ..sinks.safetensors import Destination, destination

# extensions that promise a pickle (torch.load) or a Lightning checkpoint
MISLEADING_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def check_destination(inputs: Sequence["os.PathLike | str | TensorSource"], dst: "os.PathLike | str", *,
                      overwrite: bool = False, sharded: bool = False) -> None:
    """Refuse `dst` if writing it would replace an input, or an existing file without `overwrite`.

    `sharded` says the output may be written as ``base-0000k-of-0000N.safetensors``
    shards plus an index, whose existing files are checked too. Reads no tensor
    data; a sharded input's index is read for its shard names.

    >>> check_destination(["model.ckpt"], "model.ckpt")
    Traceback (most recent call last):
    safeckpt.errors.OutputIsInputError: model.ckpt: is an input of this command ...
    """
    dest = destination(dst)
    read = _identities(inputs)
    existing = list(_existing_outputs(dest, sharded))
    for path, identity in existing:
        if identity in read:
            same = read[identity]
            what = "is an input" if os.path.abspath(same) == os.path.abspath(path) else f"is the input {same}"
            raise errors.OutputIsInputError(
                f"{what} of this command (the same file); writing there would destroy it. Nothing was "
                "read or written: choose another output", path=path)
    if existing and not overwrite:
        raise errors.OutputExistsError(
            "already exists; nothing was read or written. Replace it with overwrite=True (--force), or "
            "choose another output", path=existing[0][0])
    _check_writable(dest)
    if dest.single.lower().endswith(MISLEADING_SUFFIXES):
        warnings.warn(f"{dest.single}: writing safetensors under a {os.path.splitext(dest.single)[1]} name; "
                      "the name says pickle, the content is safetensors (name it .safetensors)",
                      UserWarning, stacklevel=3)


def _identities(inputs: Iterable["os.PathLike | str | TensorSource"]) -> dict[tuple[int, int], str]:
    """(device, inode) -> path of every file the inputs are read from."""
    found: dict[tuple[int, int], str] = {}
    for item in inputs:
        for path in _input_files(item):
            try:
                st = os.stat(path)
            except OSError:
                continue  # a missing input is the op's own error to report
            found.setdefault((st.st_dev, st.st_ino), path)
    return found


def _input_files(item: "os.PathLike | str | TensorSource") -> Iterator[str]:
    if isinstance(item, TensorSource):
        yield item.path
        yield from item.files()
        return
    path = os.fspath(item)
    yield path
    if os.path.isdir(path):
        yield from _folder_files(path)
    elif path.endswith(".json"):
        yield from _index_shards(path)


def _folder_files(folder: str) -> Iterator[str]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        yield entry.path
        if entry.name.endswith(".index.json"):
            yield from _index_shards(entry.path)


def _index_shards(path: str) -> Iterator[str]:
    from ..sources.sharded import read_index  # at call time: only sharded inputs need it

    try:
        weight_map = read_index(path)["weight_map"]
    except (errors.SafeckptError, OSError):
        return
    folder = os.path.dirname(os.path.abspath(path))
    for shard in set(weight_map.values()):
        yield os.path.join(folder, shard)


def _existing_outputs(dest: Destination, sharded: bool) -> Iterator[tuple[str, tuple[int, int]]]:
    """Each existing file this write could replace, with its (device, inode)."""
    candidates = [dest.single]
    if sharded:
        candidates.append(dest.index)
        shard = re.compile(re.escape(dest.base) + r"-\d{5}-of-\d{5}\.safetensors")
        try:
            candidates += sorted(os.path.join(dest.directory, name) for name in os.listdir(dest.directory)
                                 if shard.fullmatch(name))
        except OSError:
            pass
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if os.path.isdir(path):
            raise errors.OutputExistsError("is a directory where the output file would go; choose another "
                                           "output", path=path)
        yield path, (st.st_dev, st.st_ino)


def _check_writable(dest: Destination) -> None:
    """A folder that exists but refuses writes is named now, before any input is read."""
    folder = os.path.abspath(dest.directory)
    while not os.path.exists(folder):  # the nearest existing ancestor is where mkdir must succeed
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise errors.OutputNotWritableError("it is a file, not a folder", path=folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise errors.OutputNotWritableError("permission denied", path=folder)
