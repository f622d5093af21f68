"""A safe ``torch.load``: the objects ``torch.load`` returns, made without running the file.

`safe_load(f)` reads the file with the restricted pickle machine (`sources.pickle_vm`:
nothing in it is imported or called) and builds from what it read the tree that
``torch.load(f, weights_only=True)`` returns: dicts, ``OrderedDict`` (with a state
dict's ``_metadata``), lists, tuples, sets, ``torch.Tensor`` and ``torch.nn.Parameter``
objects that share storage wherever the file shares it, ``torch.Size``, dtypes and
devices. Where ``weights_only`` refuses plain data, it gives back what ``torch.load``
would have made: ``argparse.Namespace``, ``types.SimpleNamespace``, Lightning's
``AttributeDict``, OmegaConf's ``DictConfig``/``ListConfig``, ``pathlib`` paths, numpy
arrays, dtypes and scalars. Dates come back as ISO text, ``uuid.UUID``, ``Decimal`` and
``Fraction`` as their text (the pickle machine keeps them as data).

Objects of any other class are never built: each comes back as an inert
`PlaceholderCall` -- ``.func`` the class (a `Placeholder`: ``.module``, ``.name``,
``.qualname``), ``.args``/``.kwargs`` what it would have been called with, ``.state``
what ``BUILD`` would have given it, ``.items``/``.setitems`` what was appended or set --
and a bare reference to one as a `Placeholder`. Their arguments are converted like
everything else (a tensor in them is a tensor).

Before anything is read the file is scanned (`ops.scan`): a file the scan finds
malicious raises `UnsafeFileError` with its findings, whatever it holds.

Tensors are zero-copy views of a private (copy-on-write) map of the file when
``mmap=True`` (writing to one never changes the file), else copies; ``map_location``
works as in ``torch.load``: a device or device name, a dict from saved to new
locations, or a function of ``(storage, location)`` returning a storage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import mmap as mmap_module
import os
import pathlib
import shutil
import sys
import tempfile
import types
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from .. import errors
from ..format.checkpoint_dir import is_checkpoint, open_checkpoint, read_checkpoint
from ..frameworks.torch import from_numpy
from ..ops.scan.guard import check_safety, open_checked
from ..sources import open_source
from ..sources.pickle_allowlist import Rebuild
from ..sources.pickle_records import (KeptDict, KeptList, PathText, Placeholder, PlaceholderCall, StorageRef,
                                      TensorRef, TorchDevice, TorchDType, TorchSize, TorchStorageType)
from ..sources.torch_file import PickleSource
from ..training.state import KEPT_TYPES, join_state

__all__ = ["safe_load", "Placeholder", "PlaceholderCall"]

MapLocation = Union[None, str, torch.device, dict, Callable]
FileLike = Union[str, "os.PathLike[str]", io.IOBase, Any]

# Storages this far into the file (a multiple of 64 bytes, as torch.save aligns them since
# 2.0) are mapped; others (older files, the legacy formats) are copied, so that no tensor
# points at an address its dtype may not be read from.
_MAP_ALIGNMENT = 64
# Containers nest at most `pickle_vm.MAX_NESTING` deep; the walk takes a frame or two each.
_RECURSION = 5_000


def safe_load(f: FileLike, map_location: MapLocation = None, mmap: bool = True) -> Any:
    """What ``torch.load(f, weights_only=True)`` returns, read without running anything in the file.

    `f` is a path or a binary file object holding a ``torch.save`` file (zip, legacy or
    tar format; Lightning and Stable Diffusion ``.ckpt`` files are such files), a plain
    pickle, or a safeckpt checkpoint directory (`CheckpointManager`, `SafeCheckpointIO`);
    a safetensors, npy/npz file or sharded model gives its tensors as a dict. A file the
    scan finds malicious raises `UnsafeFileError`; a malformed one `SafeckptError`.

    >>> state = safe_load("pytorch_model.bin", map_location="cpu")
    >>> model.load_state_dict(state)
    """
    with _as_path(f) as path:
        if os.path.isdir(path) and is_checkpoint(path):
            storage, info, manifest = open_checkpoint(path)
            tensors, document = read_checkpoint(storage, info, manifest, verify=True)
            return map_tensors(join_state(tensors, document), map_location)
        if os.path.isfile(path):
            readings: dict = {}  # the scan's reading of data.pkl: the file's pickle is run once
            check_safety([path], allow=False, action="load", keep=readings)
            source = open_source(path, readings=readings)
        else:
            source = open_checked(path, allow_unsafe=False, action="load")
        try:
            if not os.path.isfile(path):
                check_safety(source.files(), allow=False, action="load")  # a model folder: the files it opened
            if isinstance(source, PickleSource):
                builder = _Builder(source, map_location, mmap)
                try:
                    return builder.value(source.value)
                finally:
                    builder.close()
            # copies: these tensors outlive the source's map of the file, and may be written to
            return map_tensors({name: from_numpy(np.array(source.read(name))) for name in source.keys()},
                               map_location)
        finally:
            source.close()


@contextlib.contextmanager
def _as_path(f: FileLike) -> Iterator[str]:
    """A path for `f`: itself, or a private temporary copy of a file object's bytes."""
    if isinstance(f, (str, os.PathLike)):
        yield os.fspath(f)
        return
    if not hasattr(f, "read"):
        raise TypeError(f"safe_load() takes a path or a binary file object, not {type(f).__name__}")
    with tempfile.TemporaryDirectory(prefix="safeckpt-load-") as folder:
        path = os.path.join(folder, "checkpoint")
        with open(path, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
        yield path


def map_tensors(tree: Any, map_location: MapLocation) -> Any:
    """`tree` with each tensor's storage placed as ``torch.load``'s `map_location` places it.

    Tensors that share a storage still share one afterwards.
    """
    if map_location is None:
        return tree
    restore = torch.serialization._get_restore_location(map_location)
    placed: dict = {}

    def move(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), str(tensor.device))
        if key not in placed:
            placed[key] = restore(storage, str(tensor.device))
        return _view(placed[key], tensor.dtype, tensor.storage_offset(), tuple(tensor.size()), tuple(tensor.stride()),
                     tensor.requires_grad, isinstance(tensor, torch.nn.Parameter))

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return move(value)
        if isinstance(value, dict):
            for key in list(value):
                value[key] = walk(value[key])
            return value
        if isinstance(value, list):
            value[:] = [walk(item) for item in value]
            return value
        if type(value) is tuple:
            return tuple(walk(item) for item in value)
        return value

    return walk(tree)


def _view(storage: Any, dtype: torch.dtype, offset: int, size: tuple, stride: tuple, requires_grad: bool,
          parameter: bool) -> torch.Tensor:
    tensor = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, size, stride)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    if requires_grad and (tensor.is_floating_point() or tensor.is_complex()):
        tensor.requires_grad_(True)
    return tensor


class _Builder:
    """Turns what the pickle machine read from one file into torch objects."""

    def __init__(self, source: PickleSource, map_location: MapLocation, mmap: bool) -> None:
        self.source = source
        self.restore = torch.serialization._get_restore_location(map_location)
        self.mmap = mmap
        self.private_map: Optional[mmap_module.mmap] = None
        self.file: Optional[io.BufferedReader] = None
        self.storages: dict[str, Any] = {}
        self.made: dict[int, Any] = {}  # id(record) -> what it became (the pickle shares objects)
        self.making: set[int] = set()

    def fail(self, detail: str) -> errors.SourceError:
        return errors.SourceError(detail, path=self.source.path)

    # -- storages and tensors
    def storage(self, ref: StorageRef) -> Any:
        if ref.key in self.storages:
            return self.storages[ref.key]
        raw = self.source.storage_view(ref.key)
        nbytes = ref.numel * ref.dtype.itemsize
        if len(raw) < nbytes:
            raise self.fail(f"storage {ref.key!r} is declared as {ref.numel} x {ref.dtype.itemsize} bytes but its "
                            f"record holds only {len(raw)} bytes")
        span = self.source.storage_span(ref.key) if nbytes else None
        if self.mmap and span is not None and span.offset % _MAP_ALIGNMENT == 0 and self.source.byteorder == "little":
            flat = torch.frombuffer(self._private_map(), dtype=torch.uint8, count=nbytes, offset=span.offset)
        else:
            flat = torch.empty(nbytes, dtype=torch.uint8)
            if span is not None:
                self._read_into(flat.numpy(), span.offset)  # no page faults on a map of the file
            elif nbytes:
                flat.numpy()[:] = np.frombuffer(raw, np.uint8, nbytes)
            if self.source.byteorder == "big" and ref.dtype.itemsize > 1:
                flat.numpy().view(f"u{ref.dtype.itemsize}").byteswap(inplace=True)
        try:
            storage = self.restore(flat.untyped_storage(), ref.location)
        except RuntimeError as exc:
            raise self.fail(f"storage {ref.key!r} was saved on {ref.location!r}: {exc}") from None
        self.storages[ref.key] = storage
        return storage

    def _read_into(self, out: np.ndarray, offset: int) -> None:
        if self.file is None:
            self.file = open(self.source.path, "rb")  # noqa: SIM115 - closed by close()
        view, done = memoryview(out), 0
        while done < len(view):
            got = os.preadv(self.file.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise self.fail(f"the file ended {len(view) - done} bytes into a storage at offset {offset}")
            done += got

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _private_map(self) -> mmap_module.mmap:
        if self.private_map is None:
            with open(self.source.path, "rb") as file:
                self.private_map = mmap_module.mmap(file.fileno(), 0, access=mmap_module.ACCESS_COPY)
        return self.private_map

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        if not isinstance(ref.storage, StorageRef):
            raise self.fail(f"a tensor's storage is {type(ref.storage).__name__}, not a stored record")
        dtype = ref.dtype or ref.storage.dtype
        try:
            return _view(self.storage(ref.storage), _torch_dtype(dtype), ref.storage_offset, ref.size, ref.stride,
                         ref.requires_grad, ref.parameter)
        except RuntimeError as exc:
            raise self.fail(f"tensor of size {list(ref.size)} over storage {ref.storage.key!r}: {exc}") from None

    # -- everything else
    def value(self, x: Any) -> Any:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, _RECURSION))
        try:
            return self.convert(x)
        finally:
            sys.setrecursionlimit(limit)

    def convert(self, x: Any) -> Any:
        if x is None or type(x) in (bool, int, float, str, bytes, complex):
            return x
        key = id(x)
        if key in self.made:
            return self.made[key]
        if key in self.making:
            raise self.fail("the pickle makes an object contain itself through a tuple; torch.load cannot build it")
        self.making.add(key)
        try:
            out = self.made[key] = self.build(x)
        finally:
            self.making.discard(key)
        return out

    def build(self, x: Any) -> Any:
        convert = self.convert
        if isinstance(x, TensorRef):
            return self.tensor(x)
        if isinstance(x, KeptDict):
            return _kept(x.kind, {k: convert(v) for k, v in x.items()})
        if isinstance(x, KeptList):
            return _kept(x.kind, [convert(v) for v in x])
        if isinstance(x, OrderedDict):
            out = self.made[id(x)] = OrderedDict()
            out.update((convert(k), convert(v)) for k, v in x.items())
            for name, attribute in vars(x).items():
                setattr(out, name, convert(attribute))
            return out
        if isinstance(x, dict):
            out = self.made[id(x)] = {}
            out.update((convert(k), convert(v)) for k, v in x.items())
            return out
        if isinstance(x, list):
            out = self.made[id(x)] = []
            out.extend(convert(v) for v in x)
            return out
        if isinstance(x, TorchSize):
            return torch.Size(x)
        if isinstance(x, tuple):
            return tuple(convert(v) for v in x)
        if isinstance(x, (set, frozenset)):
            return type(x)(convert(v) for v in x)
        if isinstance(x, TorchDType):
            return _torch_dtype(x)
        if isinstance(x, TorchDevice):
            return torch.device(str(x))
        if isinstance(x, PathText):
            return (pathlib.PureWindowsPath if x.windows else pathlib.PurePosixPath)(str(x)) \
                if x.windows != (os.name == "nt") else pathlib.Path(str(x))
        if isinstance(x, str):
            return str(x)
        if isinstance(x, np.ndarray):
            return x if x.flags.writeable else x.copy()
        if isinstance(x, StorageRef):
            return torch.storage.TypedStorage(wrap_storage=self.storage(x), dtype=_torch_dtype(x.dtype),
                                              _internal=True)
        if isinstance(x, TorchStorageType):
            return getattr(torch, x.name.rsplit(".", 1)[-1], x)
        if isinstance(x, Rebuild):
            found = _class_named(x.name)
            return Placeholder(*x.name.rsplit(".", 1), -1) if found is None else found
        if isinstance(x, PlaceholderCall):
            return PlaceholderCall(convert(x.func), tuple(convert(a) for a in x.args),
                                   {k: convert(v) for k, v in x.kwargs.items()}, x.kind, x.offset,
                                   [convert(s) for s in x.state], [convert(i) for i in x.items],
                                   [(convert(k), convert(v)) for k, v in x.setitems])
        return x  # records and plain values: Placeholder, HugeInt, slices, numpy scalars and dtypes, ...


def _torch_dtype(dtype: Any) -> torch.dtype:
    found = getattr(torch, dtype.name, None) if isinstance(dtype, TorchDType) else None
    if not isinstance(found, torch.dtype):
        raise errors.SourceError(f"torch.{getattr(dtype, 'name', dtype)} is not a dtype of this torch "
                                 f"{torch.__version__}")
    return found


def _kept(kind: str, parts: Any) -> Any:
    """A plain-data object of `kind` made from its parts (the parts themselves if it cannot be)."""
    if kind == "collections.Counter":
        return collections.Counter(parts)
    if kind == "types.SimpleNamespace":
        return types.SimpleNamespace(**parts) if all(isinstance(k, str) for k in parts) else parts
    if kind == "argparse.Namespace" and not all(isinstance(k, str) for k in parts):
        return parts
    try:
        return KEPT_TYPES[kind].rebuild(parts, None)
    except Exception:  # noqa: BLE001 - a config library refusing a value: the plain value is still the data
        return parts


# Classes a pickle may name as values (Lightning's hparams_type), given back as themselves.
_CLASSES: dict[str, Any] = {
    **{f"builtins.{kind.__name__}": kind for kind in (dict, list, tuple, set, frozenset, int, float, str, bool,
                                                      bytes, bytearray, complex, slice, range, object)},
    "collections.OrderedDict": OrderedDict,
    "collections.Counter": collections.Counter,
    "argparse.Namespace": argparse.Namespace,
    "types.SimpleNamespace": types.SimpleNamespace,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
}
_OMEGACONF_CLASSES = {"omegaconf.dictconfig.DictConfig": "DictConfig", "omegaconf.listconfig.ListConfig": "ListConfig"}


def _class_named(name: str) -> Any:
    """The class an allowlisted global names, if it is one we give back as a class; else None."""
    if name in _CLASSES:
        return _CLASSES[name]
    if name in _OMEGACONF_CLASSES:
        try:
            import omegaconf
        except ImportError:
            return None
        return getattr(omegaconf, _OMEGACONF_CLASSES[name])
    if name.endswith(".AttributeDict"):
        made = KEPT_TYPES["lightning.AttributeDict"].rebuild({}, None)
        return type(made) if type(made) is not dict else None
    return None
