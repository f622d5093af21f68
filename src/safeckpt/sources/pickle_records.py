"""What a pickle becomes when it is read as data: records and inert placeholders.

The restricted pickle machine (`pickle_vm`) and the rebuild functions of its
allowlist (`pickle_allowlist`) both make these values, and both refuse a pickle
with a `PickleError`; they live here, below both, so that neither imports the other
for them. Every name is also importable from `pickle_vm`.

    >>> TensorRef(StorageRef("0", TorchDType("float32", 4), 6, "cpu"), 0, (2, 3), (3, 1)).size
    (2, 3)
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from safeckpt.errors import SafeckptError

__all__ = ["PickleError", "brief", "Placeholder", "PlaceholderCall", "HugeInt", "TorchDType",
           "TorchStorageType", "StorageRef", "TensorRef", "DcpIndex", "KeptDict", "KeptList", "TorchSize", "TorchDevice",
           "PathText"]


class PickleError(SafeckptError, ValueError):
    """A pickle that is malformed, truncated, refused, or past one of our limits.

    Raised by `pickle_vm.load` with `opcode`, `offset` and the `globals`/`findings`
    seen so far (a rebuild of the allowlist raises it to decline its arguments).
    `bounded` is True when the machine stopped at one of its own limits (or met an
    operation it cannot model): CPython might have read on from there.
    """

    opcode: str = "?"
    offset: int = -1
    bounded: bool = False
    framed: bool = False  # a FRAME came before the failure: the file reader may read on
    globals: list = []  # noqa: RUF012 - replaced per instance by load
    findings: list = []  # noqa: RUF012


# Values from the file shown in messages: DUP/GET share objects, so a small pickle can
# describe a DAG whose full repr is exponentially long; reprlib bounds depth and width.
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 60, 60, 40
_BRIEF.maxtuple = _BRIEF.maxlist = _BRIEF.maxdict = _BRIEF.maxset = _BRIEF.maxfrozenset = 4


def brief(x: Any) -> str:
    """A short, bounded description of a value built from a file."""
    try:
        text = _BRIEF.repr(x)
    except Exception:  # noqa: BLE001 - a record's own repr failing must not hide the real error
        text = f"<{type(x).__name__}>"
    return text[:120]


@dataclass(eq=False)
class Placeholder:
    """An inert stand-in for a global that is not on the allowlist."""

    module: str
    name: str
    offset: int

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, repr=False)
class PlaceholderCall:
    """What calling or building a placeholder would have made; nothing was called.

    `kind` is the opcode that asked for the call (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ,
    INST, PERSID, BINPERSID); `state` holds BUILD states, `items` APPEND(S) items
    and `setitems` SETITEM(S) pairs applied to it afterwards.
    """

    func: Any
    args: tuple
    kwargs: dict
    kind: str
    offset: int
    state: list = field(default_factory=list)
    items: list = field(default_factory=list)
    setitems: list = field(default_factory=list)

    def __repr__(self) -> str:  # bounded: args may share objects (a DAG)
        return f"PlaceholderCall({brief(self.func)}, {self.kind} at {self.offset}, args={brief(self.args)})"


@dataclass(frozen=True)
class HugeInt:
    """An integer longer than ``Limits.max_long_bytes``: its size is kept, not its value."""

    nbytes: int

    def __repr__(self) -> str:
        return f"<integer of {self.nbytes} bytes>"


@dataclass(frozen=True)
class TorchDType:
    """A torch dtype named in a pickle (``torch.float32``), with its item size in bytes."""

    name: str
    itemsize: int


@dataclass(frozen=True)
class TorchStorageType:
    """A torch storage class (``torch.FloatStorage``, ``torch.storage.UntypedStorage``)."""

    name: str
    dtype: TorchDType


@dataclass(frozen=True)
class StorageRef:
    """A torch storage named by a persistent id: key (``data/<key>`` in a zip), dtype, element count."""

    key: str
    dtype: TorchDType
    numel: int
    location: str


@dataclass(frozen=True)
class TensorRef:
    """A torch tensor as the rebuild functions describe it; offset and strides count elements.

    `dtype` is the tensor's dtype; it differs from `storage.dtype` when the storage is
    untyped (``_rebuild_tensor_v3``, used for fp8 and other newer dtypes: `numel` then
    counts bytes). A view is checked to lie inside a `StorageRef` storage.
    """

    storage: Any
    storage_offset: int
    size: tuple
    stride: tuple
    requires_grad: bool = False
    dtype: Optional[TorchDType] = None
    parameter: bool = False



# Plain-data objects, kept as the plain value they hold (so every reader sees a dict, a
# list, a tuple or a str) and marked with what they were, so that a reader that rebuilds
# objects (`safeckpt.torch.safe_load`) can give back the same class -- from its own table
# of kinds (`training.state.KEPT_TYPES`), never by a name read from the file.

class KeptDict(dict):
    """An object kept as its attributes; `kind` is what it was (``"argparse.Namespace"``)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind


class KeptList(list):
    """A list-like object kept as its items; `kind` is what it was (``"omegaconf.ListConfig"``)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str, items: Any = ()) -> None:
        super().__init__(items)
        self.kind = kind


class TorchSize(tuple):
    """A ``torch.Size`` (a tuple of ints)."""

    __slots__ = ()


class TorchDevice(str):
    """A ``torch.device``, as its name (``"cuda:0"``)."""

    __slots__ = ()


class PathText(str):
    """A ``pathlib`` path, as its text; `windows` tells a Windows path from a POSIX one."""

    windows = False


class WindowsPathText(PathText):
    windows = True


class DcpIndex(NamedTuple):
    """torch.distributed.checkpoint's MetadataIndex (a dict key in its metadata): a tensor's fqn and
    the offset of one of its chunks (None for a non-tensor value)."""

    fqn: str
    offset: Optional[tuple]
