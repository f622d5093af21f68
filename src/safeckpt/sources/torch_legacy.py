"""PyTorch's legacy checkpoint formats (before torch 1.6), located without torch.

The legacy format
-----------------
``torch.save(obj, f, _use_new_zipfile_serialization=False)`` (``_legacy_save``
in torch/serialization.py; read back by ``_legacy_load``) writes, back to back:

1. a pickle of the magic number ``0x1950a86a20f9469cfc6c``;
2. a pickle of the protocol version, ``1001``;
3. a pickle of ``sys_info``: ``{"protocol_version": 1001, "little_endian": bool,
   "type_sizes": {"short": 2, "int": 4, "long": 8}}`` (torch ignores it on load);
4. the main pickle: the saved object. Its persistent ids are
   ``("storage", storage_type, key, location, numel, view_metadata)``:
   `storage_type` is a global such as ``torch.FloatStorage`` whose dtype gives
   the element size, `key` a string, `location` ``"cpu"`` or ``"cuda:0"``,
   `numel` the element count, and `view_metadata` None or, in files of old
   torch, ``(view_key, offset, view_size)``: the storage `view_key` is elements
   ``[offset, offset + view_size)`` of storage `key`. The first reference to a
   key decides its type and size; later references get that same storage.
   ``("module", cls, source_file, source)`` ids name the class of a whole saved
   ``nn.Module``;
5. a pickle of the list of storage keys;
6. for each key of that list, in order: the element count as a little-endian
   int64, then ``count x element size`` bytes of little-endian data. (Old torch
   wrote both in the saving machine's byte order, which sys_info names; such a
   file shows it by a big-endian count equal to the pickle's: `LegacyLayout.byteorder`.)

The legacy tar format
---------------------
torch before 0.4 (``_save`` of that time; read today by ``legacy_load`` inside
``_legacy_load``) wrote an uncompressed tar archive of four members, in this order:

``sys_info``  a pickled dict as above (``protocol_version`` 1000);
``pickle``    the main pickle; a persistent id is ``str(key)`` of a tensor or a
              storage described in the members below (torch looks up
              ``int(saved_id)``), or ``(cls, source_file, source)`` for a module;
``tensors``   a pickled count, then per tensor a pickled ``(key, storage_key,
              tensor_type)`` followed by ``ndim`` as a little-endian int32, 4
              unused bytes, ``ndim`` int64 sizes, ``ndim`` int64 strides and one
              int64 storage offset (little-endian, counted in elements);
``storages``  a pickled count, then per storage a pickled ``(key, location,
              storage_type)`` followed by an int64 element count and the raw
              bytes as in the legacy format, then a pickled list of views
              ``(key, root_key, offset, numel)``: storage `key` is elements
              ``[offset, offset + numel)`` of storage `root_key`.

Keys are integers there (the address of the object when it was saved); they become
their decimal strings in `StorageRef.key` and `LegacyLayout.storages`.

What this module does
---------------------
`read_legacy` and `read_legacy_tar` run every pickle through the restricted machine
(`pickle_vm.load`: nothing is imported or called) and *locate* every storage:
`LegacyLayout.storages` maps a storage key to the absolute offset and length of
its bytes in the file (a view's entry points inside its root's bytes), so a
source can map tensors from an mmap without copying. Tensors come out as
`pickle_vm.TensorRef` records over `pickle_vm.StorageRef` records in
`LegacyLayout.value`. Every count, size, offset and key read from the file is
checked against what the file holds; every failure is a `SourceError` naming
the file and the storage or tensor at fault.

Example::

    >>> import io, torch
    >>> f = io.BytesIO()
    >>> torch.save({"w": torch.ones(2, 3)}, f, _use_new_zipfile_serialization=False)
    >>> layout = read_legacy(f.getvalue(), "w.pt")
    >>> ref = layout.value["w"]
    >>> ref.size, ref.dtype.name, layout.storages[ref.storage.key][1]
    ((2, 3), 'float32', 24)
"""

from __future__ import annotations

import dataclasses
import re
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import SourceError
from . import pickle_vm
from .base import ViewFile
from .pickle_vm import PickleError, StorageRef, TorchStorageType

__all__ = ["PickleSpan", "LegacyLayout", "is_legacy", "is_legacy_tar", "read_legacy",
           "read_legacy_tar", "MAGIC_NUMBER", "PROTOCOL_VERSION", "TAR_MEMBERS"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# The members torch's tar format is made of; the first one names a torch tar.
TAR_MEMBERS = ("sys_info", "pickle", "tensors", "storages")

# numpy arrays have at most 64 dimensions, so no readable tensor has more; the
# bound also keeps a hostile ndim from asking for gigabytes of shape.
MAX_NDIM = 64
# torch writes four members; a real archive never comes near this, and each header
# costs a read, so a hostile chain of empty members is cut short.
MAX_TAR_MEMBERS = 64
# A tar-format key is the decimal address of an object: 20 digits at most on 64 bits.
# Python's int() of a long digit string is quadratic, so longer ones are refused.
MAX_KEY_DIGITS = 40
# Recognising the magic-number pickle takes 3 or 4 opcodes at any protocol.
_HEAD_LIMITS = pickle_vm.Limits(max_opcodes=8)

_INT64 = struct.Struct("<q")
_INT64_BE = struct.Struct(">q")
_TAR_KEY = re.compile(r"-?[0-9]{1,%d}" % MAX_KEY_DIGITS)
# pickle_vm's own rebuild: the same checks (view inside its storage) for tar tensors.
_rebuild_tensor: Callable = pickle_vm.ALLOWLIST["torch._utils._rebuild_tensor"].fn


@dataclass(frozen=True)
class PickleSpan:
    """Where one pickle lies: tar member (None in the legacy file) and absolute offsets."""

    member: Optional[str]
    start: int
    end: int


@dataclass
class LegacyLayout:
    """A legacy file located: the main object, every pickle read, where each storage lies."""

    kind: str                       # "torch-legacy" or "torch-tar"
    value: Any                      # the main object, TensorRef/StorageRef records inside
    globals: list = field(default_factory=list)              # GlobalUse, absolute offsets
    findings: list[str] = field(default_factory=list)
    pickles: list[PickleSpan] = field(default_factory=list)  # every pickle read, in file order
    # storage key -> (absolute offset of its bytes, nbytes); a view's lies inside its root's
    storages: dict[str, tuple[int, int]] = field(default_factory=dict)
    sys_info: dict = field(default_factory=dict)
    byteorder: str = "little"       # of the storages' data: "big" only in old big-endian files


# --- recognising ----------------------------------------------------------------

def is_legacy(head: bytes) -> bool:
    """Whether `head` (a file's first bytes) starts with torch's magic-number pickle.

    >>> import pickle
    >>> is_legacy(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)), is_legacy(b"PK")
    (True, False)
    """
    try:
        value = pickle_vm.load(head, limits=_HEAD_LIMITS).value
    except PickleError:
        return False
    return type(value) is int and value == MAGIC_NUMBER


def is_legacy_tar(head: bytes) -> bool:
    """Whether `head` is a tar archive whose first member is one of `TAR_MEMBERS`.

    >>> is_legacy_tar(open("old_tar.pt", "rb").read(4096)), is_legacy_tar(b"\\0" * 1024)
    (True, False)
    """
    try:
        with tarfile.open(fileobj=ViewFile(memoryview(head)), mode="r:") as tar:
            first = tar.firstmember
    except Exception:  # noqa: BLE001 - tarfile parsing untrusted bytes: anything means "no"
        return False
    return first is not None and first.name in TAR_MEMBERS


# --- shared: running pickles and collecting what they show ------------------------

class _Collector:
    """Runs the pickles of one file, keeping spans, globals and findings in file order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.views: list = []  # memoryviews of the file we made, released when done
        self.pickles: list = []
        self.globals: list = []
        self.findings: list = []

    def error(self, detail: str, **kwargs: Any) -> SourceError:
        return SourceError(detail, path=self.path, **kwargs)

    def load(self, data: Any, start: int, what: str, *, member: Optional[str] = None,
             base: int = 0, persistent_load: Optional[Callable] = None) -> tuple:
        """Run the pickle at `data[start:]`; `base` is where `data` lies in the file."""
        try:
            r = pickle_vm.load(data, start=start, persistent_load=persistent_load)
        except PickleError as e:
            # the traceback holds the machine's view of the file (an mmap could not close)
            raise self.error(f"{what}{_in_member(member)}: {e.detail}") from e.with_traceback(None)
        self.pickles.append(PickleSpan(member, base + start, base + r.end))
        self.globals.extend(dataclasses.replace(g, offset=g.offset + base) if base else g
                            for g in r.globals)
        prefix = what + _in_member(member) + (f" (offsets from byte {base})" if base else "")
        self.findings.extend(f"{prefix}: {f}" for f in r.findings)
        return r.value, r.end

    def layout(self, kind: str, value: Any, storages: dict, sys_info: Any,
               byteorder: str = "little") -> LegacyLayout:
        if not isinstance(sys_info, dict):
            self.findings.append(f"sys_info is a {type(sys_info).__name__}, not a dict")
            sys_info = {}
        self.pickles.sort(key=lambda s: s.start)
        self.globals.sort(key=lambda g: g.offset)
        return LegacyLayout(kind, value, self.globals, self.findings, self.pickles,
                            storages, sys_info, byteorder)


def _brief(x: Any) -> str:
    """A short description of a value from the file for a message.

    Never a full repr: the pickle machine builds shared references, so a few hundred
    bytes can make a structure whose repr would never finish.
    """
    if isinstance(x, (str, bytes, bytearray)):
        return repr(x[:60]) + ("..." if len(x) > 60 else "")
    if type(x) is int and x.bit_length() > 128:
        return f"an integer of {x.bit_length()} bits"  # str() of a huge int is refused or slow
    if x is None or type(x) in (int, float, bool):
        return repr(x)
    if isinstance(x, (tuple, list, dict, set, frozenset)):
        return f"a {type(x).__name__} of {len(x)} items"
    return f"a {type(x).__name__}"


def _in_member(member: Optional[str]) -> str:
    return "" if member is None else f" in tar member {member!r}"


def _text(x: Any) -> Any:
    # Python 2 era files may hold ASCII strings as bytes
    return x.decode("ascii", "replace") if isinstance(x, (bytes, bytearray)) else x


def _storage_type(stype: Any, key: Any) -> TorchStorageType:
    if isinstance(stype, TorchStorageType):
        return stype
    name = getattr(stype, "qualname", type(stype).__name__)
    raise PickleError(f"storage {_brief(key)} has type {name}, not a torch storage type we read")


def _location(x: Any, key: str) -> str:
    x = _text(x)
    if not isinstance(x, str):
        raise PickleError(f"location of storage {_brief(key)} is {_brief(x)}, not a string")
    return x


def _nonneg_int(x: Any, what: str) -> int:
    if type(x) is not int or x < 0:
        raise PickleError(f"{what} is {_brief(x)}, not a non-negative integer")
    return x


# --- the legacy format ----------------------------------------------------------

class _LegacyStorages:
    """persistent_load of the main legacy pickle: storages by key, first reference wins."""

    def __init__(self) -> None:
        self.roots: dict = {}   # key -> StorageRef
        self.views: dict = {}   # view key -> (root key, element offset, StorageRef)

    def __call__(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise PickleError(f"persistent id {_brief(pid)} is not a torch storage or module id")
        kind = _text(pid[0])
        kind = kind if isinstance(kind, str) else None
        if kind == "module" and len(pid) == 4:
            return pid[1]  # the class, as the pickle named it (a placeholder unless allowlisted)
        if kind != "storage" or len(pid) != 6:
            raise PickleError(f"persistent id {_brief(pid)} is not a torch storage or module id")
        _, stype, key, location, numel, view = pid
        key = _text(key)
        if not isinstance(key, str):
            raise PickleError(f"storage key {_brief(key)} is not a string")
        stype = _storage_type(stype, key)
        location = _location(location, key)
        numel = _nonneg_int(numel, f"element count of storage {_brief(key)}")
        root = self.roots.get(key)
        if root is None:
            if key in self.views:
                raise PickleError(f"storage key {_brief(key)} names both a view and a storage")
            root = self.roots[key] = StorageRef(key, stype.dtype, numel, location)
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise PickleError(f"view of storage {_brief(key)}: {_brief(view)} is not "
                              "(key, offset, size)")
        view_key = _text(view[0])
        if not isinstance(view_key, str) or view_key in self.roots:
            raise PickleError(f"view of storage {_brief(key)}: view key {_brief(view_key)} "
                              "is not a new key")
        if view_key not in self.views:
            offset = _nonneg_int(view[1], f"offset of view {_brief(view_key)}")
            size = _nonneg_int(view[2], f"size of view {_brief(view_key)}")
            ref = StorageRef(view_key, stype.dtype, size, root.location)
            self.views[view_key] = (key, offset, ref)
        return self.views[view_key][2]


def read_legacy(data: Any, path: str) -> LegacyLayout:
    """Locate everything in a legacy (non-zip, pre-1.6) torch file; nothing is executed.

    `data` is the whole file (bytes, mmap or memoryview); storages are located, not copied.

    >>> data = open("old.pt", "rb").read()
    >>> layout = read_legacy(data, "old.pt")
    >>> offset, nbytes = layout.storages[layout.value["w"].storage.key]
    >>> len(data[offset:offset + nbytes]) == nbytes
    True
    """
    c = _Collector(path)
    n = len(data)
    magic, pos = c.load(data, 0, "magic number pickle")
    if type(magic) is not int or magic != MAGIC_NUMBER:
        raise c.error(f"the first pickle holds {_brief(magic)}, not torch's magic number "
                      f"{MAGIC_NUMBER:#x}: not a legacy torch file")
    version, pos = c.load(data, pos, "protocol version pickle")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise c.error(f"legacy protocol version {_brief(version)} is not {PROTOCOL_VERSION}, "
                      "the only one torch reads")
    sys_info, pos = c.load(data, pos, "sys_info pickle")
    refs = _LegacyStorages()
    value, pos = c.load(data, pos, "main pickle", persistent_load=refs)
    keys, pos = c.load(data, pos, "storage key list pickle")
    if not isinstance(keys, list):
        raise c.error(f"the storage key list is a {type(keys).__name__}, not a list")

    storages: dict = {}
    big_endian_machine = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    orders: set = set()
    for key in keys:
        key = _text(key)
        ref = refs.roots.get(key) if isinstance(key, str) else None
        if ref is None:
            raise c.error(f"storage {_brief(key)} is listed after the main pickle, which never "
                          "names it as a storage")
        if key in storages:
            raise c.error(f"storage {_brief(key)} is listed twice")
        count, order = _storage_count(data, pos, n, key, ref.numel, big_endian_machine, c)
        orders.add(order)
        nbytes = count * ref.dtype.itemsize
        if nbytes > n - pos - 8:
            raise c.error(f"storage {_brief(key)}: {count} x {ref.dtype.itemsize} bytes from "
                          f"offset {pos + 8} run past the end of the file ({n} bytes; "
                          "truncated file)")
        storages[key] = (pos + 8, nbytes)
        pos += 8 + nbytes
    orders.discard(None)
    if len(orders) > 1:
        raise c.error("the storage counts are little-endian for some storages and big-endian "
                      "for others")
    byteorder = orders.pop() if orders else "little"
    if big_endian_machine:
        c.findings.append(f"saved on a big-endian machine; the storages are {byteorder}-endian")
    missing = [k for k in refs.roots if k not in storages]
    if missing:
        raise c.error(f"storage {_brief(missing[0])} is named by the main pickle but its bytes "
                      f"are not in the file ({len(missing)} storage(s) missing)")
    for view_key, (root_key, offset, ref) in refs.views.items():
        itemsize = ref.dtype.itemsize
        storages[view_key] = _view_span(storages[root_key], view_key, root_key,
                                        offset * itemsize, ref.numel * itemsize, c)
    if pos < n:
        c.findings.append(f"{n - pos} bytes after the last storage (from offset {pos}) "
                          "belong to no storage")
    return c.layout("torch-legacy", value, storages, sys_info, byteorder)


def _storage_count(data: Any, pos: int, n: int, key: str, numel: int, big_endian_machine: bool,
                   c: _Collector) -> tuple:
    """The element count in front of a storage's bytes, and the byte order it shows
    ("little", "big", or None when it reads the same both ways)."""
    if n - pos < 8:
        raise c.error(f"element count of storage {_brief(key)}: needs 8 bytes at offset {pos}, "
                      f"the file has {max(n - pos, 0)} (truncated file)")
    little, big = _INT64.unpack_from(data, pos)[0], _INT64_BE.unpack_from(data, pos)[0]
    if little == numel:
        return little, None if big == numel else "little"
    if big == numel and big_endian_machine:
        return big, "big"  # torch before 1.0 wrote the saving machine's byte order
    raise c.error(f"storage {_brief(key)}: the file holds {little} elements, the main "
                  f"pickle declares {numel}")


def _view_span(root: tuple, key: str, root_key: str, start: int, nbytes: int,
               c: _Collector) -> tuple:
    root_offset, root_nbytes = root
    if start + nbytes > root_nbytes:
        raise c.error(f"storage view {_brief(key)}: bytes [{start}, {start + nbytes}) lie "
                      f"outside its root storage {_brief(root_key)} of {root_nbytes} bytes")
    return (root_offset + start, nbytes)


# --- the tar format ---------------------------------------------------------------

def _tar_members(view: memoryview, c: _Collector) -> dict:
    """name -> (data offset, size) of each member; tar tricks are errors or findings."""
    members: dict = {}
    try:
        with tarfile.open(fileobj=ViewFile(view), mode="r:") as tar:
            for count, info in enumerate(iter(tar.next, None)):
                if count >= MAX_TAR_MEMBERS:
                    raise c.error(f"more than {MAX_TAR_MEMBERS} tar members; torch writes four")
                _tar_member(info, view, members, c)
    except tarfile.TarError as e:
        raise c.error(f"not a readable tar archive: {e}") from None
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile parsing untrusted bytes
        raise c.error(f"malformed tar archive ({type(e).__name__}: {str(e)[:200]})") from None
    for name in TAR_MEMBERS[1:]:
        if name not in members:
            raise c.error(f"the tar archive has no {name!r} member: not a legacy torch checkpoint")
    return members


def _tar_member(info: tarfile.TarInfo, view: memoryview, members: dict, c: _Collector) -> None:
    name = info.name
    if name not in TAR_MEMBERS:
        c.findings.append(f"tar member {_brief(name)} is not part of a torch checkpoint; ignored")
        return
    if name in members:
        # torch takes the last one; a scanner reading the first would be fooled
        raise c.error(f"tar member {name!r} appears twice")
    if not info.isfile() or info.issparse():
        raise c.error(f"tar member {name!r} is a {_TAR_TYPES.get(info.type, 'special entry')}, "
                      "not a regular file")
    if info.offset_data + info.size > len(view):
        raise c.error(f"tar member {name!r} claims {info.size} bytes from offset "
                      f"{info.offset_data}, past the end of the file ({len(view)} bytes)")
    members[name] = (info.offset_data, info.size)


_TAR_TYPES = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
              tarfile.DIRTYPE: "directory", tarfile.FIFOTYPE: "fifo",
              tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}


def _tar_key(x: Any, what: str) -> str:
    """A tar-format key (an int, or its decimal string in persistent ids) as a string."""
    x = _text(x)
    if type(x) is int:
        return str(x)
    if isinstance(x, str) and _TAR_KEY.fullmatch(x):
        return str(int(x))
    raise PickleError(f"{what} {_brief(x)} is not an integer key")


class _Member:
    """One tar member's bytes, read record by record."""

    def __init__(self, view: memoryview, name: str, span: tuple, c: _Collector) -> None:
        self.name, self.base, self.size = name, span[0], span[1]
        self.view = view[span[0]:span[0] + span[1]]
        c.views.append(self.view)
        self.pos, self.c = 0, c

    def pickle(self, what: str, persistent_load: Optional[Callable] = None) -> Any:
        value, self.pos = self.c.load(self.view, self.pos, what, member=self.name, base=self.base,
                                      persistent_load=persistent_load)
        return value

    def count(self, what: str) -> int:
        n = self.pickle(f"{what} count")
        if type(n) is not int or n < 0:
            raise self.c.error(f"tar member {self.name!r}: the {what} count is {_brief(n)}")
        return n

    def ints(self, code: str, k: int, what: str) -> tuple:
        """`k` little-endian integers of struct `code` ("i" int32, "q" int64)."""
        need = struct.calcsize("<" + code) * k
        if self.size - self.pos < need:
            raise self.c.error(f"tar member {self.name!r}: {what} needs {need} bytes at "
                               f"offset {self.base + self.pos}, the member has "
                               f"{self.size - self.pos} left (truncated member)")
        out = struct.unpack_from(f"<{k}{code}", self.view, self.pos)
        self.pos += need
        return out

    def done(self) -> None:
        if self.pos < self.size:
            self.c.findings.append(f"tar member {self.name!r}: {self.size - self.pos} bytes "
                                   f"after its last record (from offset {self.base + self.pos}) "
                                   "are unread")

    def record(self, what: str, check: Callable, *args: Any) -> Any:
        """`check(*args)` on a record, turning a bad value into an error naming this member."""
        try:
            return check(*args)
        except PickleError as e:
            raise self.c.error(f"tar member {self.name!r}: {what}: {e.detail}") from None


def _read_storages(m: _Member, c: _Collector) -> tuple:
    """Storage key -> StorageRef, and key -> (absolute offset, nbytes), views included."""
    refs: dict = {}
    spans: dict = {}
    # each record takes bytes, so a lying count ends at the member's end, with an error
    for _ in range(m.count("storage")):
        rec = m.pickle("storage record")
        key, dtype, location = m.record("storage record", _storage_record, rec)
        if key in refs:
            raise c.error(f"storage {_brief(key)} appears twice in tar member 'storages'")
        (count,) = m.ints("q", 1, f"element count of storage {_brief(key)}")
        if count < 0:
            raise c.error(f"storage {_brief(key)} has a negative element count {count}")
        nbytes = count * dtype.itemsize
        if nbytes > m.size - m.pos:
            raise c.error(f"storage {_brief(key)}: {count} x {dtype.itemsize} bytes from offset "
                          f"{m.base + m.pos} run past the end of tar member 'storages' "
                          f"({m.size - m.pos} bytes left; truncated member)")
        refs[key] = StorageRef(key, dtype, count, location)
        spans[key] = (m.base + m.pos, nbytes)
        m.pos += nbytes
    views = m.pickle("storage view list")
    if not isinstance(views, list):
        raise c.error(f"the storage view list is a {type(views).__name__}, not a list")
    for view in views:
        key, root_key, offset, numel = m.record("storage view", _view_record, view)
        if key in refs:
            raise c.error(f"storage view {_brief(key)} reuses the key of a storage")
        if root_key not in refs:
            raise c.error(f"storage view {_brief(key)} names storage {_brief(root_key)}, which "
                          "is not in tar member 'storages'")
        root = refs[root_key]
        isz = root.dtype.itemsize
        spans[key] = _view_span(spans[root_key], key, root_key, offset * isz, numel * isz, c)
        refs[key] = StorageRef(key, root.dtype, numel, root.location)
    m.done()
    return refs, spans


def _storage_record(rec: Any) -> tuple:
    if not (isinstance(rec, tuple) and len(rec) == 3):
        raise PickleError(f"{_brief(rec)} is not (key, location, storage_type)")
    key = _tar_key(rec[0], "storage key")
    return key, _storage_type(rec[2], key).dtype, _location(rec[1], key)


def _view_record(view: Any) -> tuple:
    if not (isinstance(view, tuple) and len(view) == 4):
        raise PickleError(f"{_brief(view)} is not (key, root_key, offset, numel)")
    return (_tar_key(view[0], "view key"), _tar_key(view[1], "root key"),
            _nonneg_int(view[2], "view offset"), _nonneg_int(view[3], "view size"))


def _read_tensors(m: _Member, storages: dict, c: _Collector) -> dict:
    """Tensor key -> TensorRef, each checked to lie inside its storage."""
    tensors: dict = {}
    for _ in range(m.count("tensor")):
        rec = m.pickle("tensor record")
        key, storage_key = m.record("tensor record", _tensor_record, rec)
        if key in tensors or key in storages:
            raise c.error(f"tensor key {key} is used twice in the archive")
        (ndim,) = m.ints("i", 1, f"ndim of tensor {key}")
        if not 0 <= ndim <= MAX_NDIM:
            raise c.error(f"tensor {key} has {ndim} dimensions; at most {MAX_NDIM} are readable")
        m.ints("i", 1, f"padding after ndim of tensor {key}")
        size = m.ints("q", ndim, f"sizes of tensor {key}")
        stride = m.ints("q", ndim, f"strides of tensor {key}")
        (offset,) = m.ints("q", 1, f"storage offset of tensor {key}")
        storage = storages.get(storage_key)
        if storage is None:
            raise c.error(f"tensor {key} names storage {_brief(storage_key)}, which is not in "
                          "tar member 'storages'")
        tensors[key] = m.record(f"tensor {key}", _rebuild_tensor, storage, offset, size, stride)
    m.done()
    return tensors


def _tensor_record(rec: Any) -> tuple:
    # the third item, the tensor's class (torch.FloatTensor), is implied by the storage
    if not (isinstance(rec, tuple) and len(rec) == 3):
        raise PickleError(f"{_brief(rec)} is not (key, storage_key, tensor_type)")
    return _tar_key(rec[0], "tensor key"), _tar_key(rec[1], "storage key")


def _tar_persistent_load(objects: dict) -> Callable:
    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 3:
            return pid[0]  # (cls, source_file, source) of a saved module class
        key = _tar_key(pid, "persistent id")
        try:
            return objects[key]
        except KeyError:
            raise PickleError(f"persistent id {key} names no tensor or storage of the archive") \
                from None
    return persistent_load


def read_legacy_tar(data: Any, path: str) -> LegacyLayout:
    """Locate everything in a torch < 0.4 tar checkpoint; nothing is extracted or executed.

    `data` is the whole file (bytes, mmap or memoryview); storages are located, not copied.

    >>> layout = read_legacy_tar(open("old_tar.pt", "rb").read(), "old_tar.pt")
    >>> layout.kind, [s.member for s in layout.pickles][:2]
    ('torch-tar', ['sys_info', 'pickle'])
    """
    c = _Collector(path)
    view = memoryview(data).cast("B")
    c.views.append(view)
    try:
        members = _tar_members(view, c)
        storages, spans = _read_storages(_Member(view, "storages", members["storages"], c), c)
        tensors = _read_tensors(_Member(view, "tensors", members["tensors"], c), storages, c)
        main = _Member(view, "pickle", members["pickle"], c)
        value = main.pickle("main pickle", _tar_persistent_load({**storages, **tensors}))
        main.done()
        sys_info: Any = {}
        if "sys_info" in members:
            info = _Member(view, "sys_info", members["sys_info"], c)
            sys_info = info.pickle("sys_info pickle")
            info.done()
        else:
            c.findings.append("the tar archive has no 'sys_info' member")
        return c.layout("torch-tar", value, spans, sys_info)
    finally:
        # an error's traceback keeps these frames alive: release every view of the
        # file so that the caller can still close its mmap
        for v in reversed(c.views):
            v.release()
