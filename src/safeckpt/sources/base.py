"""TensorSource: every readable format as one lazy, read-only mapping of tensors.

A source maps tensor names to `TensorInfo(dtype, shape, nbytes)` (dtype is a
safetensors dtype name) and gives each tensor's values with `read(name)` as a
numpy array: a zero-copy view of the file where its bytes allow it. Everything
in a checkpoint that is not a tensor (epoch, hyper-parameters, optimizer
scalars, the names of classes a pickle wanted built) is in `tree`, JSON-able,
with each tensor replaced by ``{"__tensor__": name}``.

Names of tensors found inside nested containers are their paths joined with
dots (``state_dict.encoder.weight``, ``optimizer_states.0.state.3.exp_avg``),
which is what a flattened state dict looks like to every other tool.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import math
import mmap
import os
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES
from ..format.storage import open_regular
from .pickle_vm import HugeInt, Placeholder, PlaceholderCall, TorchDType, TorchStorageType, brief

# A tree is cut below this depth (pickles may nest up to pickle_vm.MAX_NESTING; a
# recursive JSON encoder would fail long before that).
MAX_TREE_DEPTH = 100
# Nodes emitted into a tree in total; a DAG that shares containers is emitted once
# per container (later uses become references), so this only bounds huge flat data.
MAX_TREE_NODES = 2_000_000
# Items of one container shown in the tree; the rest are summarised.
MAX_TREE_ITEMS = 100_000
# Characters of a tensor name made from a path: real ones are under a few hundred; a
# hostile file with long keys nested deep must not make every name megabytes long.
MAX_NAME_CHARS = 1024
# Notes kept about one file.
MAX_NOTES = 100
# Integers wider than this many bits are shown as ``{"__int__": "<integer of N bytes>"}``, not
# by their digits: Python refuses str() of an int of more than 4300 digits (a limit that may be
# set as low as 640, which 2048 bits stay under), and a tree value should not be a page of digits.
MAX_INT_BITS = 2048


class TensorInfo(NamedTuple):
    """One tensor of a source: safetensors dtype name, shape, size in bytes."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FileSpan(NamedTuple):
    """Where a tensor's bytes lie in a regular file exactly as a safetensors file stores
    them (C order, little-endian): ``nbytes`` bytes from ``offset`` of ``path``."""

    path: str
    offset: int
    nbytes: int


class TensorSource(abc.ABC):
    """A checkpoint opened for reading; nothing in it is ever executed.

    >>> with safeckpt.open_source("pytorch_model.bin") as src:
    ...     for name in src:
    ...         print(name, src[name].shape, src.read(name).mean())
    """

    #: short format name: "safetensors", "torch-zip", "torch-legacy", "npz", ...
    format: str = "?"

    def __init__(self, path: str) -> None:
        self.path = path
        self.tree: Any = None
        self.metadata: Optional[dict[str, str]] = None
        #: name -> the name of an identical tensor (same bytes of the same storage,
        #: same shape, strides and dtype): tied weights, stored once on conversion.
        self.aliases: dict[str, str] = {}
        #: notes on what opening found that a user should know (placeholders made,
        #: names disambiguated); the scan gives the verdict.
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """Add a note; a hostile file cannot make the list grow without bound."""
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("more notes left out")

    # -- the mapping
    @property
    @abc.abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor, in the source's own order."""

    def keys(self) -> list[str]:
        return list(self.infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise errors.TensorNotFoundError(
                f"no tensor named {name!r} in this {self.format} file ({len(self.infos)} tensors)",
                path=self.path) from None

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for name, info in self.infos.items() if name not in self.aliases)

    # -- the data
    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor's values; a read-only zero-copy view of the file where possible.

        dtypes with no numpy equivalent of their own come as ml_dtypes arrays (bf16,
        fp8, fp4 unpacked); F6 tensors come as their packed bytes (uint8).
        """

    def read_checked(self, name: str) -> np.ndarray:
        """`read(name)`, checked against what `infos` lists for it: a numpy array of the
        listed shape and dtype (any byte order); for dtypes numpy cannot hold (F6, read as
        packed bytes), any array. Ops that write what they read use this, so that a source
        whose parser disagrees with its own listing fails here, not in the output.

        >>> src.read_checked("encoder.weight").shape
        (768, 768)
        """
        array = self.read(name)
        info = self.infos[name]
        expected = DTYPES[info.dtype].numpy
        if not isinstance(array, np.ndarray) or (expected is not None and (
                tuple(array.shape) != tuple(info.shape)
                or array.dtype.newbyteorder("<") != expected.newbyteorder("<"))):
            got = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
            raise errors.SourceError(f"the source listed {info.dtype}{list(info.shape)} but gave {got}",
                                     path=self.path, tensor=name)
        return array

    def file_span(self, name: str) -> Optional[FileSpan]:
        """Where the tensor's bytes lie in a file exactly as a safetensors file stores them
        (C order, little-endian), else None. The file is one of `files()`: a shard's file for
        a sharded checkpoint.

        Lets a conversion copy the bytes file to file in the kernel.

        >>> src.file_span("encoder.weight")
        FileSpan(path='model.safetensors', offset=1024, nbytes=2359296)
        """
        return None

    def files(self) -> list[str]:
        """The files the tensors are read from: each shard's file for a sharded checkpoint,
        else the source's own file. What the scan checks before an op writes from a source.

        >>> open_source("llama/model.safetensors.index.json").files()
        ['/models/llama/model-00001-of-00002.safetensors', '/models/llama/model-00002-of-00002.safetensors']
        """
        return [self.path]

    def release(self, name: str) -> None:
        """A hint that `name`'s bytes are no longer needed (mapped pages may be dropped).

        Converting a model larger than memory stays within bounds this way: the file
        pages already written out are given back as the conversion goes.
        """

    def describe(self) -> str:
        """One line: what the file is."""
        return f"{self.format} file, {len(self)} tensors"

    def close(self) -> None:
        """Release the file; arrays already read stay valid only for copying sources."""

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}: {self.describe()}>"


# --- from a nested value (a pickle's result) to names and a JSON-able tree ------

class FlatTree(NamedTuple):
    """Tensors found in a nested value, by dotted path, and the rest as JSON-able data."""

    tensors: dict[str, Any]
    tree: Any
    notes: list[str]


def flatten(value: Any, is_tensor: Callable[[Any], bool],
            describe_object: Optional[Callable[[Any], Optional[dict]]] = None) -> FlatTree:
    """Walk `value`; tensors get dotted names, everything else becomes JSON-able.

    Bounded whatever the input: depth (`MAX_TREE_DEPTH`), total nodes
    (`MAX_TREE_NODES`), and a container reached a second time (pickles can share
    objects, and a DAG's tree can be exponentially large) becomes
    ``{"__same_as__": "its.first.path"}``; a tensor reached again gets its new
    name as an alias by the caller (`tensors` maps both names to the one object).

    `describe_object(x)` turns a non-plain object into a dict of its parts (to be
    walked further), or None to fall back to its repr.
    """
    walker = _Walker(is_tensor, describe_object)
    tree = walker.walk(value, "", 0)
    return FlatTree(walker.tensors, tree, walker.notes)


class _Walker:
    def __init__(self, is_tensor: Callable, describe_object: Optional[Callable]) -> None:
        self.is_tensor = is_tensor
        self.describe_object = describe_object
        self.tensors: dict[str, Any] = {}
        self.seen: dict[int, tuple[str, Any]] = {}  # id -> (first path, object kept alive)
        self.nodes = 0
        self.notes: list[str] = []
        self.repeats: dict[str, int] = {}

    def name_for(self, path: str) -> str:
        name = path or "tensor"
        if len(name) > MAX_NAME_CHARS:  # keep the end (the most specific part), made unique
            digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            name = f"~{digest}~{name[-(MAX_NAME_CHARS - 18):]}"
        unique = unique_name(name, self.tensors, self.repeats)
        if unique != name:
            self.note(f"two tensors are both named {name[:200]!r}; the second is {unique[-200:]}")
        return unique

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("more notes left out")

    def walk(self, x: Any, path: str, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_TREE_NODES:
            if self.nodes == MAX_TREE_NODES + 1:
                self.note(f"the structure has more than {MAX_TREE_NODES} parts; the rest is cut")
            return "<cut: too many parts>"
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return x if abs(x) < 1 << 63 else int_text(x)
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if self.is_tensor(x):
            name = self.name_for(path)
            self.tensors[name] = x
            return {"__tensor__": name}
        if isinstance(x, np.generic):
            return self.walk(x.item(), path, depth)
        if isinstance(x, (bytes, bytearray)):
            return {"__bytes__": len(x), "head": bytes(x[:32]).hex()}
        if isinstance(x, complex):
            return {"__complex__": [self.walk(x.real, path, depth), self.walk(x.imag, path, depth)]}
        if depth >= MAX_TREE_DEPTH:
            return "<cut: nested too deep>"
        first = self.seen.get(id(x))
        if first is not None and first[1] is x:
            return {"__same_as__": first[0]}
        self.seen[id(x)] = (path, x)
        if isinstance(x, dict):
            out: dict = {}
            for i, (k, v) in enumerate(x.items()):
                if i >= MAX_TREE_ITEMS:
                    out["__cut__"] = f"{len(x) - i} more items"
                    break
                key = _key_text(k)
                out[key if key not in out else f"{key}~{i}"] = self.walk(v, _join(path, key), depth + 1)
            return out
        if isinstance(x, (list, tuple, set, frozenset)):
            items = sorted(x, key=brief) if isinstance(x, (set, frozenset)) else x
            out_list = [self.walk(v, _join(path, str(i)), depth + 1)
                        for i, v in enumerate(items) if i < MAX_TREE_ITEMS]
            if len(items) > MAX_TREE_ITEMS:
                out_list.append(f"<cut: {len(items) - MAX_TREE_ITEMS} more items>")
            return out_list
        parts = self.describe_object(x) if self.describe_object is not None else None
        if parts is not None:
            return {k: self.walk(v, _join(path, k), depth + 1) if not k.startswith("__") else v
                    for k, v in parts.items()}
        return {"__repr__": brief(x)}


def unique_name(name: str, taken: Any, repeats: dict[str, int]) -> str:
    """`name`, or ``name~k`` with the least k >= 2 not in `taken` when it is. `repeats` remembers
    the last k of each name, so that many tensors under one name cost linear time, not quadratic.

    >>> unique_name("w", {"w", "w~2"}, {})
    'w~3'
    """
    if name not in taken:
        return name
    k = repeats.get(name, 1)
    while True:
        k += 1
        if f"{name}~{k}" not in taken:
            break
    repeats[name] = k
    return f"{name}~{k}"


def int_text(x: int) -> Any:
    """A large integer in a tree: its digits, or ``{"__int__": "<integer of N bytes>"}`` past
    `MAX_INT_BITS` (as the pickle machine's `HugeInt`, an integer too long to keep, is shown)."""
    if x.bit_length() <= MAX_INT_BITS:
        return str(x)
    return {"__int__": f"<integer of {x.bit_length() // 8 + 1} bytes>"}


def _key_text(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, int) and not isinstance(k, bool) and k.bit_length() > MAX_INT_BITS:
        return int_text(k)["__int__"]
    if isinstance(k, (bool, int, float)) or k is None:
        return str(k)
    if isinstance(k, tuple):
        return ",".join(_key_text(v) for v in k)
    return brief(k)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- shared by the pickle-based sources --------------------------------------------

def describe_object(x: Any) -> Optional[dict]:
    """What the JSON tree shows for the pickle machine's records."""
    if isinstance(x, Placeholder):
        return {"__global__": x.qualname}
    if isinstance(x, PlaceholderCall):
        parts: dict = {"__object__": _callee_name(x.func), "args": list(x.args)}
        for key in ("kwargs", "state", "items", "setitems"):
            value = getattr(x, key)
            if value:
                parts[key] = value
        return parts
    if isinstance(x, (TorchDType, TorchStorageType)):
        return {"__torch__": f"torch.{x.name}" if isinstance(x, TorchDType) else x.name}
    if isinstance(x, slice):
        return {"__slice__": [x.start, x.stop, x.step]}
    if isinstance(x, HugeInt):
        return {"__int__": repr(x)}
    return None


def _callee_name(func: Any) -> str:
    if isinstance(func, Placeholder):
        return func.qualname
    if isinstance(func, PlaceholderCall):
        return _callee_name(func.func) + "()"
    return "persistent id" if func is None else type(func).__name__


def map_file(path: str) -> mmap.mmap:
    """The whole file, mapped read-only (a FIFO or device is refused unopened: `open_regular`)."""
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size == 0:
            raise errors.SourceError("the file is empty", path=path)
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def unmap(mapping: Optional[mmap.mmap]) -> None:
    """Close a mapping from `map_file`; while arrays (or an error's traceback) still point
    into it, it is unmapped instead when the last of them goes."""
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:
        pass


@contextlib.contextmanager
def mapped(path: str) -> Iterator[Any]:
    """A regular file's bytes, mapped read-only (nothing is read until touched); b"" when empty.

    A FIFO, socket or device is refused unopened (`NotRegularFileError`, an OSError).

    >>> with mapped("model.bin") as data:
    ...     head = bytes(data[:8])
    """
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size == 0:
            yield b""
            return
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        yield mapping
    finally:
        unmap(mapping)


class ReadTooLarge(OSError):
    """One read asked for more than a `ViewFile` gives at once."""


class ViewFile(io.RawIOBase):
    """A read-only file over a memoryview, so that zipfile, tarfile and numpy read a mapped
    file without copying it. One read never allocates more than the bytes left, and a
    read of more than `max_read` is refused (tarfile reads a PAX header whole, and the
    file decides its size)."""

    def __init__(self, view: memoryview, max_read: int = 64 << 20) -> None:
        self.view, self.pos, self.max_read = view, 0, max_read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        end = len(self.view) if size is None or size < 0 else min(len(self.view), self.pos + size)
        if end - self.pos > self.max_read:
            raise ReadTooLarge(f"a single read of {end - self.pos} bytes (more than {self.max_read})")
        out = bytes(self.view[self.pos:max(self.pos, end)])
        self.pos = max(self.pos, end)
        return out

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset + (0, self.pos, len(self.view))[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos
