"""A restricted pickle machine: read a pickle as data, never as a program.

The format
----------
A pickle (protocols 0 to 5, as written by Python 2.x/3.x `pickle`) is a program
for a small stack machine. Each instruction is one opcode byte followed by an
argument whose encoding depends on the opcode (a newline-terminated line, a
1/2/4/8-byte little-endian length plus that many bytes, a fixed-size integer or
float). The machine has a stack, a stack of marks (``MARK`` saves the stack and
starts a new one; ``LIST``, ``TUPLE``, ``DICT``, ``APPENDS``, ``SETITEMS``,
``ADDITEMS``, ``FROZENSET``, ``INST``, ``OBJ`` and ``POP_MARK`` consume the items
since the last mark) and a memo (``PUT``/``MEMOIZE`` store the top of the
stack, ``GET`` pushes a stored object again). ``STOP`` ends the program and the
top of the stack is the result. ``PROTO`` (protocol 2+) and ``FRAME``
(protocol 4+) are headers with no effect on the result.

What makes pickles dangerous is that ``GLOBAL``/``STACK_GLOBAL``/``INST`` name
any importable object and ``REDUCE``/``NEWOBJ``/``NEWOBJ_EX``/``OBJ``/``INST``
call it, ``BUILD`` calls ``__setstate__``, ``APPEND(S)``/``SETITEM(S)`` call
methods of whatever is on the stack, ``PERSID``/``BINPERSID`` call the loader's
hook and ``EXT1/2/4`` look names up in the process-wide ``copyreg`` registry.

What this module does
---------------------
`load` runs the program with every opcode dispatched from `OPCODE_TABLE` (a
handler for each opcode of protocols 0-5, names from `pickletools`), following
CPython's ``_pickle`` unpickler wherever it accepts a pickle (a scanner that
refuses what the loader accepts would stop reading where the loader goes on). A
fixed-width argument is read by the dispatch loop, as pickletools describes it,
so that opcodes that differ only in how their argument is encoded (BINGET,
LONG_BINGET and GET; BININT1, BININT2 and BININT; ...) share one handler. But:

* Nothing is ever imported and nothing named by the file is ever called. A
  global name (after Python 2 names are mapped as ``_compat_pickle`` maps them)
  is looked up in `ALLOWLIST` (``pickle_allowlist``), a table from
  ``"module.qualname"`` to our own side-effect-free rebuild functions and
  records (torch tensor and storage rebuilds, numpy arrays/dtypes/scalars,
  ``OrderedDict``, a few builtins, plain-data classes such as
  ``argparse.Namespace``, ``datetime`` or ``uuid.UUID`` which become plain
  data). Every other name becomes an inert `Placeholder`; calling it or
  building it makes a `PlaceholderCall` recording the arguments.
* ``EXT1/2/4`` resolve only against `EXTENSION_TABLE`, which is empty:
  ``copyreg`` is never consulted. An EXT code becomes a placeholder and a finding.
* Torch tensors become `TensorRef` records over `StorageRef` records (the
  persistent ids of the torch formats); the bytes are mapped elsewhere
  (``sources/torch_file.py``). torch is never imported.
* numpy arrays and scalars are rebuilt from their raw bytes (checked against
  shape x itemsize); object, structured and void dtypes are never built: such an
  array stays an inert `PlaceholderCall` and is reported in `findings`.
* Out-of-band buffers (``NEXT_BUFFER``) fail, as they do in every loader that
  passes no ``buffers``.
* Where an allowlisted rebuild declines its arguments, `load(strict=True)`
  (reading a checkpoint) raises; `load(strict=False)` (scanning) records the
  refusal in `PickleResult.refusals`, keeps an inert placeholder and reads on,
  as CPython would run on with the real function's result.
* Values CPython builds but no reader needs are kept inert instead of refused:
  an integer longer than ``max_long_bytes`` becomes a `HugeInt`, a container
  nested deeper than ``max_nesting`` is wrapped in a placeholder (so that no
  later recursive walk, hash or repr can overflow the C stack).
* Frames are read the two ways CPython reads them (`READERS`): ``"bytes"`` is
  ``pickle.loads`` (a frame changes nothing), ``"file"`` is ``pickle.load`` of a
  file without ``peek()`` (``io.BytesIO``, an unbuffered file; a buffered file
  does the same for frames of 128 KiB or more): the whole frame is read at once,
  so an argument that runs past the frame's end is read from after it, and the
  next pickle starts after the frame, not after STOP. Any place where the two
  readings differ is an anomaly (`PickleResult.anomalies`; `strict` raises):
  no pickler writes one.
* Everything an attacker controls is bounded by a `Limits` value (defaults
  are the ``MAX_*`` constants below) and every failure is a `PickleError`
  naming the opcode and its byte offset (also as ``.opcode``/``.offset``, with the
  ``.globals`` seen before the failure, so a scan still reports them); no other
  exception escapes. ``PickleError.bounded`` tells a failure at one of our own
  limits (CPython might have read on) from a pickle CPython refuses too.

The machine is iterative (no recursion on the data). ``DUP``/``GET`` make
shared references, not copies, so a small pickle can describe a DAG whose
*tree* walk is exponential: a later consumer that walks the result must
de-duplicate by identity (or bound its work).

Example::

    >>> import pickle
    >>> load(pickle.dumps({"a": [1, 2.5]}, protocol=2)).value
    {'a': [1, 2.5]}
"""

from __future__ import annotations

import codecs
import collections
import pickletools
import re
import struct
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .pickle_allowlist import ALLOWLIST, EXTENSION_TABLE, Pending, Rebuild
from .pickle_records import (HugeInt, PickleError, Placeholder, PlaceholderCall, StorageRef, TensorRef,
                             TorchDType, TorchStorageType, brief)

__all__ = [
    "PickleError", "Limits", "PickleResult", "GlobalUse", "Placeholder", "PlaceholderCall",
    "TensorRef", "StorageRef", "TorchDType", "TorchStorageType", "HugeInt", "brief", "load", "load_all",
    "READERS",
    "ALLOWLIST", "EXTENSION_TABLE", "OPCODE_TABLE",
    "MAX_OPCODES", "MAX_STACK", "MAX_MEMO", "MAX_NESTING", "MAX_TOTAL_BYTES",
    "MAX_LINE", "MAX_LONG_BYTES",
]


# --- limits ----------------------------------------------------------------
# Each bounds something the file controls so that reading cannot be turned into a
# denial of service. Lift one by passing `Limits(name=...)` to `load`.

# Opcodes executed per pickle: a state dict of 100k tensors takes about 3M.
MAX_OPCODES = 20_000_000
# Items on the stack (all marks together): an APPENDS of a million items is plausible.
MAX_STACK = 5_000_000
# Memo entries: each costs a dict slot; real pickles have about one per object.
MAX_MEMO = 5_000_000
# Container nesting depth kept as real containers: a later recursive walk (repr, ==,
# JSON) fails near Python's recursion limit of 1000 and hash() of nested tuples recurses
# in C without a limit. Deeper values are wrapped in an inert placeholder (CPython builds
# them, so the machine reads on). MARKs may nest as deep as the stack allows.
MAX_NESTING = 900
# Total bytes of all strings/bytes arguments (each one is also never more than the
# bytes left in the data, so no claimed length allocates memory it cannot fill).
MAX_TOTAL_BYTES = 1 << 34
# One newline-terminated argument (protocol 0 ints, floats, names, strings): CPython
# reads a line of any length, so this is only the total bound (each line also counts
# toward it, and is searched without copying).
MAX_LINE = MAX_TOTAL_BYTES
# Bytes of one integer (LONG1/LONG4, or digits of INT/LONG text) that is kept as a
# number: int.from_bytes is linear, but str() and arithmetic on huge ints later are
# not. A longer one becomes an inert `HugeInt`.
MAX_LONG_BYTES = 1 << 16


@dataclass(frozen=True)
class Limits:
    """The bounds one `load` runs under; see the ``MAX_*`` constants for reasons."""

    max_opcodes: int = MAX_OPCODES
    max_stack: int = MAX_STACK
    max_memo: int = MAX_MEMO
    max_nesting: int = MAX_NESTING
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_line: int = MAX_LINE
    max_long_bytes: int = MAX_LONG_BYTES


# --- what one load reports ----------------------------------------------------

@dataclass(frozen=True)
class GlobalUse:
    """One global named by the pickle (GLOBAL, STACK_GLOBAL, INST or EXT)."""

    module: str
    name: str
    offset: int
    allowed: bool


@dataclass
class PickleResult:
    """The value of one pickle, every global it named, and where its reader stops.

    `end` is the offset after STOP for the ``"bytes"`` reader; for the ``"file"``
    reader it is where the file is left, the end of the frame around STOP when there
    is one. `storages` lists the torch storages its persistent ids named (default
    loader only), so that their records can be checked against the sizes the pickle
    claims. `refusals` are the allowlisted rebuilds that declined their arguments
    (``strict=False`` only) and `anomalies` the places where the two readers of
    frames disagree; each text starts with the opcode and its offset.
    """

    value: Any
    globals: list
    end: int
    findings: list = field(default_factory=list)
    storages: list = field(default_factory=list)
    refusals: list = field(default_factory=list)
    anomalies: list = field(default_factory=list)


# Modules torch.load renames before it imports them (torch/serialization.py, _load).
_TORCH_MODULES = {"torch.tensor": "torch._tensor"}

# How the bytes of a pickle reach the unpickler (see the module docstring).
READERS = ("bytes", "file")


# --- the machine ---------------------------------------------------------------

_HIGHEST_PROTOCOL = 5
_CONTAINERS = (list, dict, tuple, set, frozenset, PlaceholderCall)
# Values CPython could never call (REDUCE/NEWOBJ/OBJ on them fails there too); anything
# else the machine holds may stand for a callable object, so calling it reads on.
_NOT_CALLABLE = (type(None), bool, int, float, complex, str, bytes, bytearray, tuple, list, dict,
                 set, frozenset, slice, range, TensorRef, StorageRef, TorchDType, HugeInt,
                 np.ndarray, np.dtype, np.generic)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


class _Machine:
    def __init__(self, data: Any, start: int, persistent_load: Optional[Callable], limits: Limits,
                 reader: str, strict: bool, persistent_ids: bool) -> None:
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.n = len(self.data)
        self.start = start
        self.persistent_load = persistent_load
        self.persistent_ids = persistent_ids
        self.limits = limits
        self.file_reader = reader == "file"
        self.strict = strict
        self.stack: list = []
        self.metastack: list = []
        self.saved = 0  # items in the stacks saved by MARK, and one for each MARK
        self.memo: dict = {}
        self.memo_of_pending: dict = {}
        self.depths: dict = {}
        self.total_bytes = 0
        self.globals: list = []
        self.findings: list = []
        self.storages: list = []
        self.refusals: list = []
        self.anomalies: list = []
        self.frame_end = -1  # where the current frame (the file reader's buffer) ends; -1: none
        self.framed = False  # a FRAME was read: only then can the two readers differ
        self.op_special: Optional[str] = None  # a name for errors that are not at an opcode
        self.op_pos = start
        self.value: Any = None

    # errors
    def fail(self, detail: str, bounded: bool = False) -> PickleError:
        error = PickleError(f"{self.op_name} at offset {self.op_pos}: {detail}")
        error.bounded = bounded
        return error

    def limit(self, detail: str) -> PickleError:
        """One of our own bounds: CPython might have read on."""
        return self.fail(detail, bounded=True)

    def anomaly(self, detail: str) -> None:
        text = f"{self.op_name} at offset {self.op_pos}: {detail}"
        if self.strict:
            raise PickleError(f"{text}: the readers of pickle frames disagree on this file (no "
                              "pickler writes such frames; the file was crafted)")
        if len(self.anomalies) < 100:
            self.anomalies.append(text)

    # reading: where the bytes asked for really come from
    def straddle(self, pos: int, size: int, linear: bool = False) -> int:
        """`size` bytes at `pos` run past the end of the current frame. pickle.loads reads
        on; a file reader had read the whole frame, so it drops the frame's last bytes and
        reads from the frame's end (but copies counted bytes on: `linear`)."""
        end = self.frame_end
        self.anomaly(f"{size} bytes read at offset {pos} run past the end of the frame at {end}")
        self.frame_end = -1
        return end if self.file_reader and not linear else pos

    def take(self, pos: int, size: int, linear: bool = False) -> tuple:
        """`size` bytes from `pos` (counted toward the total): (bytes, position after)."""
        if pos < self.frame_end < pos + size:
            pos = self.straddle(pos, size, linear)
        if size < 0 or size > self.n - pos:  # checked first: a claimed length allocates nothing
            raise self.fail(f"needs {size} bytes but only {self.n - pos} are left (truncated data)")
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            raise self.limit(f"strings and bytes exceed {self.limits.max_total_bytes} bytes in total "
                             "(raise Limits.max_total_bytes)")
        return bytes(self.data[pos:pos + size]), pos + size

    def line(self, pos: int) -> tuple:
        """A newline-terminated argument: (its bytes without the newline, position after)."""
        nl = self.find_newline(pos)
        if pos < self.frame_end and not 0 <= nl < self.frame_end:
            moved = self.straddle(pos, (nl if nl >= 0 else self.n) + 1 - pos)
            if moved != pos:
                pos, nl = moved, self.find_newline(moved)
        if nl < 0:
            raise self.fail("line argument has no newline (truncated data)")
        if nl - pos > self.limits.max_line:
            raise self.limit(f"line argument longer than {self.limits.max_line} bytes "
                             "(raise Limits.max_line)")
        self.total_bytes += nl - pos
        if self.total_bytes > self.limits.max_total_bytes:
            raise self.limit(f"strings and bytes exceed {self.limits.max_total_bytes} bytes in total "
                             "(raise Limits.max_total_bytes)")
        return bytes(self.data[pos:nl]), nl + 1

    def find_newline(self, pos: int) -> int:
        if isinstance(self.data, bytes):
            return self.data.find(b"\n", pos)
        # in growing chunks: a view is copied to search it, and lines are usually short
        chunk = 256
        while pos < self.n:
            stop = min(self.n, pos + chunk)
            found = bytes(self.data[pos:stop]).find(b"\n")
            if found >= 0:
                return pos + found
            pos, chunk = stop, min(chunk * 4, 1 << 24)
        return -1

    # stack
    def push(self, x: Any) -> None:
        self.stack.append(x)

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise self.fail("no MARK to pop to (mark stack underflow)")
        items = self.stack
        self.stack = self.metastack.pop()
        self.saved -= len(self.stack) + 1
        return items

    # depth bookkeeping: depths[id(x)] = (depth, x), the x keeping its id from being reused;
    # only containers deeper than 1 are recorded. Read inline: every container passes here.
    def made(self, container: Any, children: Any) -> Any:
        """`container`, built from `children`; wrapped inert when it would nest too deep."""
        d, depths = 0, self.depths
        for c in children:
            if isinstance(c, _CONTAINERS):
                e = depths.get(id(c))
                cd = e[0] if e is not None and e[1] is c else 1
                if cd > d:
                    d = cd
        if d + 1 > self.limits.max_nesting:
            return self.too_deep(container)
        if d:
            depths[id(container)] = (d + 1, container)
        return container

    def fit(self, container: Any, children: list) -> list:
        """`children` about to go into `container` in place; any that would make it nest
        too deep is wrapped inert instead (its parents keep their recorded depth)."""
        depths = self.depths
        e = depths.get(id(container))
        d = (e[0] if e is not None and e[1] is container else 0) - 1
        out = children
        for i, c in enumerate(children):
            if isinstance(c, _CONTAINERS):
                e = depths.get(id(c))
                cd = e[0] if e is not None and e[1] is c else 1
                if cd + 1 > self.limits.max_nesting:
                    if out is children:
                        out = list(children)
                    out[i] = self.too_deep(c)
                    cd = 1
                if cd > d:
                    d = cd
        if d > 0:
            depths[id(container)] = (d + 1, container)
        return out

    def too_deep(self, value: Any) -> PlaceholderCall:
        if len(self.findings) < 100:
            self.findings.append(f"{self.op_name} at offset {self.op_pos}: containers nest deeper "
                                 f"than {self.limits.max_nesting}; the deeper part is kept inert")
        return PlaceholderCall(Placeholder("<safeckpt>", "nested-too-deep", self.op_pos), (value,), {},
                               self.op_name, self.op_pos)

    # globals and calls
    def find_global(self, module: Any, name: Any, pos: int) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("STACK_GLOBAL requires str")
        # as CPython's find_class maps Python 2 names (for every protocol: a superset)
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[module, name]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        module = _TORCH_MODULES.get(module, module)
        qual = f"{module}.{name}"
        allowed = qual in ALLOWLIST
        self.globals.append(GlobalUse(module, name, pos, allowed))
        return ALLOWLIST[qual] if allowed else Placeholder(module, name, pos)

    def call(self, func: Any, args: Any, kwargs: Any, kind: str) -> Any:
        if not isinstance(args, tuple):
            raise self.fail(f"call arguments must be a tuple, got {type(args).__name__}")
        if not isinstance(kwargs, dict):
            raise self.fail("keyword arguments must be a dict")
        if isinstance(func, Rebuild):
            try:
                out = func.fn(*args, **kwargs)
            except (PickleError, TypeError, ValueError, OverflowError, RecursionError) as exc:
                out = self.refuse(func.name, args, exc)
            if isinstance(out, PlaceholderCall) and out.offset == -1:
                self.refused(out)
            return out
        if isinstance(func, _NOT_CALLABLE):
            raise self.fail(f"{type(func).__name__} is not callable")
        return self.made(PlaceholderCall(func, args, dict(kwargs), kind, self.op_pos),
                         list(args) + list(kwargs.values()))

    def refuse(self, name: str, args: tuple, exc: BaseException) -> PlaceholderCall:
        """An allowlisted rebuild declined its arguments: an error when reading strictly,
        else an inert placeholder (CPython would have run on with the real result)."""
        detail = exc.detail if isinstance(exc, PickleError) else f"{type(exc).__name__}: {str(exc)[:200]}"
        if detail.startswith(f"{self.op_name} at offset {self.op_pos}: "):
            detail = detail.split(": ", 1)[1]
        if self.strict:
            raise self.fail(detail)
        self.refusals.append(f"{self.op_name} at offset {self.op_pos}: {name}: {detail}")
        module, _, qualname = name.rpartition(".")
        return PlaceholderCall(Placeholder(module, qualname, self.op_pos), args, {}, self.op_name,
                               self.op_pos)

    def refused(self, out: PlaceholderCall) -> None:
        """An allowlisted function declined to build something: keep it inert and say so."""
        out.offset = self.op_pos
        if isinstance(out.func, Placeholder):
            out.func.offset = self.op_pos
            self.findings.append(f"{self.op_name} at offset {self.op_pos}: "
                                 f"{out.func.qualname} with {brief(out.args)} was not built")

    @property
    def op_name(self) -> str:
        if self.op_special is not None:
            return self.op_special
        return OPCODE_TABLE[self.data[self.op_pos]][0]

    def run(self) -> int:
        pos = self.start
        count = 0
        max_opcodes, max_stack = self.limits.max_opcodes, self.limits.max_stack
        table = _BY_BYTE
        data, n = self.data, self.n
        while True:
            if pos >= n:
                self.op_special, self.op_pos = "end of data", pos
                raise self.fail("the pickle ends without STOP (truncated data)")
            self.op_pos = pos
            entry = table[data[pos]]
            if entry is None:
                self.op_special = f"byte 0x{data[pos]:02x}"
                raise self.fail("not a pickle opcode")
            count += 1
            if count > max_opcodes:
                raise self.limit(f"more than {max_opcodes} opcodes (raise Limits.max_opcodes)")
            handler, size, unpack = entry
            try:
                if not size:
                    pos = handler(self, pos + 1)
                elif size == 1:  # the commonest argument (BININT1, BINGET, BINPUT); no frame ends inside it
                    pos += 1
                    if pos >= n:
                        raise self.fail("needs 1 byte but none is left (truncated data)")
                    pos = handler(self, pos + 1, data[pos])
                else:
                    pos += 1
                    if pos < self.frame_end < pos + size:
                        pos = self.straddle(pos, size)
                    if pos + size > n:
                        raise self.fail(f"needs {size} bytes but only {n - pos} are left (truncated data)")
                    pos = handler(self, pos + size, unpack(data, pos)[0])
            except PickleError as e:
                if e.detail.startswith(self.op_name + " at offset"):
                    raise
                raise self.fail(e.detail, e.bounded) from None
            except (Exception, RecursionError) as e:  # noqa: BLE001 - nothing else may escape
                msg = f"missing {brief(e.args[0])}" if isinstance(e, KeyError) and e.args else str(e)[:200]
                # not a failure we know CPython shares: the machine could not follow
                raise self.limit(f"{type(e).__name__}: {msg}") from None
            if pos < 0:
                return -pos
            if len(self.stack) + self.saved > max_stack:
                raise self.limit(f"stack exceeds {max_stack} items (raise Limits.max_stack)")


# --- opcode handlers ----------------------------------------------------------------
# Each follows the load_* function of CPython's Modules/_pickle.c of the same name. A
# handler is called with the position after its opcode byte, and returns the position
# of the next opcode: handler(machine, pos) -> pos. An opcode with a fixed-width
# argument (`_FIXED_ARGUMENTS`) has it read by the dispatch loop, and its handler is
# called with the position after the argument and the argument's value:
# handler(machine, pos, value) -> pos. Opcodes that differ only in how their argument
# is encoded (BINGET, LONG_BINGET and GET) share one handler.

# The fixed-width argument of each opcode that has one, as a struct format: an integer,
# a float, or the byte count of the bytes that follow (pickletools' TAKEN_FROM_ARGUMENT*).
# The widths are pickletools'; the signedness is CPython's (its byte counts are unsigned
# but LONG4's, where pickletools reads BINSTRING's as signed).
_FIXED_ARGUMENTS = {
    "BININT1": "<B", "BININT2": "<H", "BININT": "<i", "BINFLOAT": ">d", "LONG1": "<B", "LONG4": "<i",
    "SHORT_BINSTRING": "<B", "BINSTRING": "<I", "SHORT_BINBYTES": "<B", "BINBYTES": "<I",
    "BINBYTES8": "<Q", "BYTEARRAY8": "<Q", "SHORT_BINUNICODE": "<B", "BINUNICODE": "<I",
    "BINUNICODE8": "<Q", "BINGET": "<B", "LONG_BINGET": "<I", "BINPUT": "<B", "LONG_BINPUT": "<I",
    "EXT1": "<B", "EXT2": "<H", "EXT4": "<i", "PROTO": "<B", "FRAME": "<Q",
}


# - pushing values

def op_push_argument(m: _Machine, pos: int, value: Any) -> int:
    """BININT1, BININT2, BININT, BINFLOAT: the argument is the value."""
    m.stack.append(value)
    return pos


def op_long_binary(m: _Machine, pos: int, size: int) -> int:
    """LONG1, LONG4: a little-endian two's-complement integer of `size` bytes."""
    if size < 0:
        raise m.fail("LONG pickle has negative byte count")
    raw, pos = m.take(pos, size)
    m.stack.append(HugeInt(size) if size > m.limits.max_long_bytes
                   else int.from_bytes(raw, "little", signed=True))
    return pos


def _counted(make: Callable, linear: bool = False) -> Callable:
    """The strings, bytes and bytearrays of protocols 1-5: `size` bytes, made into a value."""
    # bytes and bytearray payloads are copied on past a frame's end (_Unpickler_ReadInto);
    # strings are read like every other argument
    def handler(m: _Machine, pos: int, size: int) -> int:
        raw, pos = m.take(pos, size, linear)
        try:
            m.stack.append(make(raw))
        except UnicodeDecodeError as exc:
            raise m.fail(f"invalid UTF-8 in a string ({exc.reason})") from None
        return pos
    return handler


def _py2_string(raw: bytes) -> Any:
    # Python 2 str: text when it is ASCII, raw bytes otherwise (numpy data)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return raw


def _utf8(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


# Numbers in text, as CPython parses them: INT with C's strtol(s, &end, 0) (then, if that
# fails, Python's int(s, 0)), LONG with int(s, 0), FLOAT with a C strtod; C reads a
# string up to its first NUL, so a line may hide anything after one.
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_LONG_MAX = (1 << 63) - 1


def _c_string(text: bytes) -> bytes:
    nul = text.find(b"\0")
    return text if nul < 0 else text[:nul]


def _py_int(m: _Machine, text: bytes, base: int) -> Any:
    """int(text, base) as PyLong_FromString reads it; a huge literal stays inert."""
    text = _c_string(text)
    if len(text) > 2 * m.limits.max_long_bytes:
        return HugeInt(len(text) // 2)
    try:
        return int(text.decode("ascii"), base)
    except UnicodeDecodeError:
        raise m.fail(f"invalid literal for an integer: {brief(text)}") from None
    except ValueError as exc:
        if "Exceeds the limit" in str(exc):  # Python 3.11+ refuses, 3.10 reads it: read on
            return HugeInt(len(text) // 2)
        raise m.fail(f"invalid literal for an integer: {brief(text)}") from None


def op_int(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if not text:
        raise m.fail("empty INT argument")
    if text[:1] == b"\0":  # strtol converts nothing and stops at the NUL: that is accepted, as 0
        m.push(False if len(text) == 2 else 0)
        return pos
    match = _STRTOL.match(_c_string(text))
    if match is not None:
        sign, digits = match.groups()
        if digits[:2] in (b"0x", b"0X"):
            value = int(digits[2:], 16)
        elif digits[:1] == b"0":
            value = int(digits, 8)
        else:
            value = int(digits, 10) if len(digits) <= 2 * m.limits.max_long_bytes else None
        if value is not None and value <= _LONG_MAX + (sign == b"-"):
            value = -value if sign == b"-" else value
            m.push(bool(value) if len(text) == 2 and value in (0, 1) else value)
            return pos
    m.push(_py_int(m, text, 0))  # strtol overflowed or stopped early: Python's parser
    return pos


def op_long(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if not text:
        raise m.fail("empty LONG argument")
    if text.endswith(b"L"):
        text = text[:-1]
    m.push(_py_int(m, text, 0))
    return pos


def op_float(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if not text:
        raise m.fail("empty FLOAT argument")
    try:
        m.push(float(_c_string(text).decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise m.fail(f"could not convert {brief(text)} to a float") from None
    return pos


def op_string(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if len(text) >= 2 and text[0] == text[-1] and text[:1] in (b"'", b'"'):
        text = text[1:-1]
    else:
        raise m.fail("STRING argument is not quoted")
    try:
        m.push(_py2_string(codecs.escape_decode(text)[0]))
    except ValueError as exc:
        raise m.fail(f"STRING argument: {exc}") from None
    return pos


def op_unicode(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    try:
        m.push(str(text, "raw-unicode-escape"))
    except UnicodeDecodeError as exc:
        raise m.fail(f"UNICODE argument: {exc.reason}") from None
    return pos


def _push_const(value: Any) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        m.stack.append(value)
        return pos
    return handler


def _push_new(factory: Callable) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        m.stack.append(factory())
        return pos
    return handler


# - the memo

def op_memo_get(m: _Machine, pos: int, key: int) -> int:
    """BINGET, LONG_BINGET (and GET): push the object stored under `key` again (shared, not copied)."""
    try:
        m.stack.append(m.memo[key])
    except KeyError:
        raise m.fail(f"memo key {brief(key)} was never stored") from None
    return pos


def op_memo_put(m: _Machine, pos: int, key: int) -> int:
    """BINPUT, LONG_BINPUT (and PUT, MEMOIZE): store the top of the stack under `key`."""
    if not m.stack:
        raise m.fail("stack underflow")
    value, memo = m.stack[-1], m.memo
    if key not in memo and len(memo) >= m.limits.max_memo:
        raise m.limit(f"memo exceeds {m.limits.max_memo} entries (raise Limits.max_memo)")
    memo[key] = value
    if isinstance(value, Pending):  # BUILD replaces it in the memo too
        m.memo_of_pending.setdefault(id(value), (value, []))[1].append(key)
    return pos


def _memo_key(m: _Machine, pos: int) -> tuple:
    """GET's and PUT's argument: a line with a decimal key. (key, position after)."""
    text, pos = m.line(pos)
    key = _py_int(m, text, 10)
    if type(key) is not int:
        raise m.fail(f"memo key {brief(text)} is not an integer")
    return key, pos


def op_get(m: _Machine, pos: int) -> int:
    key, pos = _memo_key(m, pos)
    return op_memo_get(m, pos, key)


def op_put(m: _Machine, pos: int) -> int:
    key, pos = _memo_key(m, pos)
    if key < 0:
        raise m.fail("negative PUT argument")
    return op_memo_put(m, pos, key)


def op_memoize(m: _Machine, pos: int) -> int:
    return op_memo_put(m, pos, len(m.memo))


# - calls

def _call(kind: str, keywords: bool = False) -> Callable:
    """REDUCE (func, args), NEWOBJ (cls, args) and NEWOBJ_EX (cls, args, kwargs)."""
    def handler(m: _Machine, pos: int) -> int:
        kwargs = m.pop() if keywords else {}
        args = m.pop()
        func = m.pop()
        m.stack.append(m.call(func, args, kwargs, kind))
        return pos
    return handler


# - the stack, marks and containers

def op_mark(m: _Machine, pos: int) -> int:
    m.metastack.append(m.stack)
    m.saved += len(m.stack) + 1
    m.stack = []
    return pos


def op_stop(m: _Machine, pos: int) -> int:
    value = m.pop()
    if isinstance(value, Pending):
        if m.strict:
            raise m.fail("the result is an object that was never given its state (BUILD)")
        value = m.refuse(type(value).__name__, (), PickleError("never given its state (BUILD)"))
    m.value = value
    if pos < m.frame_end:
        m.anomaly(f"STOP leaves {m.frame_end - pos} bytes of its frame unread")
        if m.file_reader:
            pos = m.frame_end  # the file reader had read them: the next pickle starts after
    return -pos


def op_pop(m: _Machine, pos: int) -> int:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()
    return pos


def op_pop_mark(m: _Machine, pos: int) -> int:
    m.pop_mark()
    return pos


def op_dup(m: _Machine, pos: int) -> int:
    m.push(m.top())
    return pos


def op_next_buffer(m: _Machine, pos: int) -> int:
    raise m.fail("out-of-band buffers (pickle protocol 5 buffer_callback) need a buffers= "
                 "argument no checkpoint loader passes")


def op_readonly_buffer(m: _Machine, pos: int) -> int:
    m.top()  # makes a read-only view of a bytearray; bytes and views are already read-only
    return pos


def _extend(m: _Machine, target: Any, items: list) -> None:
    """APPEND(S): CPython calls target.extend (or .append); no items is a no-op on anything."""
    if not items:
        return
    if isinstance(target, list):
        target.extend(m.fit(target, items))
    elif isinstance(target, PlaceholderCall):
        target.items.extend(m.fit(target, items))
    elif isinstance(target, set):
        target.update(x for x in m.fit(target, items) if _hashable(x))
    # anything else: CPython calls its extend/append, or fails; nothing we keep


def op_append(m: _Machine, pos: int) -> int:
    item = m.pop()
    _extend(m, m.top(), [item])
    return pos


def op_appends(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    _extend(m, m.top(), items)
    return pos


def op_additems(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    target = m.top()
    if not items:
        return pos
    if isinstance(target, set):
        target.update(x for x in m.fit(target, items) if _hashable(x))
    elif isinstance(target, PlaceholderCall):
        target.items.extend(m.fit(target, items))
    # anything else: CPython calls its add(), or fails; nothing we keep
    return pos


def _setitems(m: _Machine, target: Any, flat: list) -> None:
    """SETITEM(S): CPython calls target[key] = value on whatever target is."""
    if not flat:
        return
    if len(flat) % 2:
        raise m.fail("odd number of items for SETITEMS")
    flat = m.fit(target, flat)
    pairs = zip(flat[::2], flat[1::2])
    if isinstance(target, dict):
        for k, v in pairs:
            if _hashable(k):  # an unhashable stand-in may be a hashable object in CPython
                target[k] = v
    elif isinstance(target, PlaceholderCall):
        target.setitems.extend(pairs)
    elif isinstance(target, list):
        for k, v in pairs:
            if type(k) is int and -len(target) <= k < len(target):
                target[k] = v
    # anything else: CPython calls its __setitem__, or fails; nothing we keep


def op_setitem(m: _Machine, pos: int) -> int:
    value = m.pop()
    key = m.pop()
    _setitems(m, m.top(), [key, value])
    return pos


def op_setitems(m: _Machine, pos: int) -> int:
    flat = m.pop_mark()
    _setitems(m, m.top(), flat)
    return pos


def op_list(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    m.push(m.made(items, items))
    return pos


def op_tuple(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    m.push(m.made(tuple(items), items))
    return pos


def op_dict(m: _Machine, pos: int) -> int:
    flat = m.pop_mark()
    if len(flat) % 2:
        raise m.fail("odd number of items for DICT")
    out: dict = {}
    _setitems(m, out, flat)
    m.push(out)
    return pos


def op_frozenset(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    m.push(m.made(frozenset(x for x in items if _hashable(x)), items))
    return pos


def _tuple_n(k: int) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        if len(m.stack) < k:
            raise m.fail("stack underflow")
        items = m.stack[len(m.stack) - k:]
        del m.stack[len(m.stack) - k:]
        m.push(m.made(tuple(items), items))
        return pos
    return handler


# - globals, objects, persistent ids

def _names(m: _Machine, pos: int, encoding: str) -> tuple:
    """The module and name lines of GLOBAL (UTF-8) and INST (ASCII): ((module, name), position after)."""
    module, pos = m.line(pos)
    name, pos = m.line(pos)
    if not module or not name:
        raise m.fail("empty module or name line")
    try:
        return (module.decode(encoding), name.decode(encoding)), pos
    except UnicodeDecodeError:
        raise m.fail(f"module or name is not {encoding}") from None


def op_global(m: _Machine, pos: int) -> int:
    (module, name), pos = _names(m, pos, "utf-8")
    m.push(m.find_global(module, name, m.op_pos))
    return pos


def op_stack_global(m: _Machine, pos: int) -> int:
    name = m.pop()
    module = m.pop()
    m.push(m.find_global(module, name, m.op_pos))
    return pos


def op_inst(m: _Machine, pos: int) -> int:
    if not m.metastack:
        raise m.fail("no MARK to pop to (mark stack underflow)")
    (module, name), pos = _names(m, pos, "ascii")
    cls = m.find_global(module, name, m.op_pos)
    args = m.pop_mark()
    m.push(m.call(cls, tuple(args), {}, "INST"))
    return pos


def op_obj(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    if not items:
        raise m.fail("OBJ needs a class after the MARK (stack underflow)")
    m.push(m.call(items[0], tuple(items[1:]), {}, "OBJ"))
    return pos


def op_build(m: _Machine, pos: int) -> int:
    if len(m.stack) < 2:
        raise m.fail("stack underflow")
    state = m.stack.pop()
    obj = m.stack[-1]
    if isinstance(obj, Pending):
        try:
            new = obj.finish(state)
        except (PickleError, TypeError, ValueError, OverflowError) as exc:
            new = m.refuse(type(obj).__name__, (state,), exc)
        if isinstance(new, PlaceholderCall) and new.offset == -1:
            m.refused(new)
        m.stack[-1] = new
        entry = m.memo_of_pending.pop(id(obj), None)
        if entry is not None:
            for key in entry[1]:
                m.memo[key] = new
    elif isinstance(obj, PlaceholderCall):
        obj.state.extend(m.fit(obj, [state]))
    elif isinstance(obj, collections.OrderedDict):
        # attributes of an OrderedDict (torch's state_dict._metadata) are not items: kept
        # as attributes (torch's weights_only loader keeps them too), plain names only
        if isinstance(state, dict):
            names = [k for k in state if type(k) is str and k.isidentifier() and not k.startswith("__")]
            values = m.fit(obj, [state[k] for k in names])
            obj.__dict__.update(zip(names, values))
    elif isinstance(obj, dict):
        # plain-data classes (Namespace, AttributeDict) keep their __dict__ as items
        inst, slots = (state if isinstance(state, tuple) and len(state) == 2 else (state, None))
        for part in (inst, slots):
            if isinstance(part, dict):
                _setitems(m, obj, [x for pair in part.items() for x in pair])
    # anything else: CPython calls its __setstate__ or sets attributes; nothing we keep
    return pos


def _persistent(m: _Machine, pid: Any) -> Any:
    if not m.persistent_ids:
        raise m.fail("a persistent id, but this loader has no persistent_load")
    if m.persistent_load is not None:
        return m.persistent_load(pid)
    if (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], TorchStorageType) and isinstance(pid[2], str)
            and type(pid[4]) is int and pid[4] >= 0):
        ref = StorageRef(pid[2], pid[1].dtype, pid[4], pid[3] if isinstance(pid[3], str) else brief(pid[3]))
        m.storages.append(ref)
        return ref
    return PlaceholderCall(None, (pid,), {}, m.op_name, m.op_pos)


def op_persid(m: _Machine, pos: int) -> int:
    if not m.persistent_ids:
        raise m.fail("a persistent id, but this loader has no persistent_load")
    text, pos = m.line(pos)
    try:
        pid = text.decode("ascii")
    except UnicodeDecodeError:
        raise m.fail("persistent IDs in protocol 0 must be ASCII strings") from None
    m.push(_persistent(m, pid))
    return pos


def op_binpersid(m: _Machine, pos: int) -> int:
    m.push(_persistent(m, m.pop()))
    return pos


def op_ext(m: _Machine, pos: int, code: int) -> int:
    """EXT1, EXT2, EXT4: a name in copyreg's registry, which is never read."""
    if code <= 0:
        raise m.fail("EXT specifies code <= 0")
    if code in EXTENSION_TABLE:
        module, name = EXTENSION_TABLE[code]
        m.push(m.find_global(module, name, m.op_pos))
        return pos
    m.globals.append(GlobalUse("copyreg.extension", str(code), m.op_pos, False))
    m.findings.append(f"{m.op_name} at offset {m.op_pos}: extension code {code} "
                      "(resolved by copyreg in the loading process) is not resolved")
    m.push(Placeholder("copyreg.extension", str(code), m.op_pos))
    return pos


# - headers

def op_proto(m: _Machine, pos: int, proto: int) -> int:
    if proto > _HIGHEST_PROTOCOL:
        raise m.fail(f"unsupported pickle protocol {proto}")
    return pos


def op_frame(m: _Machine, pos: int, size: int) -> int:
    end = m.frame_end
    if pos < end:  # a frame inside a frame: pickle.py refuses it, the C readers do not
        if pos + size <= end:
            m.anomaly(f"a frame of {size} bytes inside the frame that ends at {end}")
            return pos
        pos = m.straddle(pos, size)
    if size > m.n - pos:
        raise m.fail(f"frame of {size} bytes runs past the end of the data (truncated data)")
    m.frame_end = pos + size
    m.framed = True
    return pos


_HANDLERS: dict = {
    "MARK": op_mark, "STOP": op_stop, "POP": op_pop, "POP_MARK": op_pop_mark, "DUP": op_dup,
    "INT": op_int, "LONG": op_long, "FLOAT": op_float, "STRING": op_string, "UNICODE": op_unicode,
    "BININT": op_push_argument, "BININT1": op_push_argument, "BININT2": op_push_argument,
    "BINFLOAT": op_push_argument, "LONG1": op_long_binary, "LONG4": op_long_binary,
    "BINSTRING": _counted(_py2_string), "SHORT_BINSTRING": _counted(_py2_string),
    "BINBYTES": _counted(bytes, linear=True), "SHORT_BINBYTES": _counted(bytes, linear=True),
    "BINBYTES8": _counted(bytes, linear=True), "BYTEARRAY8": _counted(bytearray, linear=True),
    "SHORT_BINUNICODE": _counted(_utf8), "BINUNICODE": _counted(_utf8), "BINUNICODE8": _counted(_utf8),
    "NONE": _push_const(None), "NEWTRUE": _push_const(True), "NEWFALSE": _push_const(False),
    "EMPTY_TUPLE": _push_const(()), "EMPTY_DICT": _push_new(dict), "EMPTY_LIST": _push_new(list),
    "EMPTY_SET": _push_new(set),
    "GET": op_get, "BINGET": op_memo_get, "LONG_BINGET": op_memo_get,
    "PUT": op_put, "BINPUT": op_memo_put, "LONG_BINPUT": op_memo_put, "MEMOIZE": op_memoize,
    "REDUCE": _call("REDUCE"), "NEWOBJ": _call("NEWOBJ"), "NEWOBJ_EX": _call("NEWOBJ_EX", keywords=True),
    "OBJ": op_obj, "INST": op_inst, "BUILD": op_build,
    "GLOBAL": op_global, "STACK_GLOBAL": op_stack_global, "EXT1": op_ext, "EXT2": op_ext, "EXT4": op_ext,
    "APPEND": op_append, "APPENDS": op_appends, "SETITEM": op_setitem, "SETITEMS": op_setitems,
    "ADDITEMS": op_additems, "LIST": op_list, "DICT": op_dict, "FROZENSET": op_frozenset,
    "TUPLE": op_tuple, "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2), "TUPLE3": _tuple_n(3),
    "PERSID": op_persid, "BINPERSID": op_binpersid,
    "NEXT_BUFFER": op_next_buffer, "READONLY_BUFFER": op_readonly_buffer,
    "PROTO": op_proto, "FRAME": op_frame,
}


def _argument(name: str) -> tuple:
    """(width, reader) of the fixed-width argument of the opcode `name`; (0, None) if none."""
    fmt = _FIXED_ARGUMENTS.get(name)
    return (0, None) if fmt is None else (struct.calcsize(fmt), struct.Struct(fmt).unpack_from)


_COUNT_WIDTHS = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                 pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}


def _fixed_width(op: pickletools.OpcodeInfo) -> int:
    """The bytes of `op`'s fixed-width argument as pickletools describes it; 0 if none."""
    if op.arg is None or op.arg.n == pickletools.UP_TO_NEWLINE:
        return 0
    return op.arg.n if op.arg.n > 0 else _COUNT_WIDTHS[op.arg.n]


# opcode byte -> (name, handler); every opcode pickletools knows must have a handler, and
# a fixed-width argument exactly where pickletools describes one, of the width it gives.
OPCODE_TABLE: dict = {ord(op.code): (op.name, _HANDLERS[op.name]) for op in pickletools.opcodes}
assert len(OPCODE_TABLE) == len(_HANDLERS), "an opcode handler has no pickletools opcode"
assert all(_fixed_width(op) == _argument(op.name)[0] for op in pickletools.opcodes), \
    "a fixed-width argument differs from pickletools' description of its opcode"
# the same for the machine's dispatch loop, indexed by byte: (handler, argument width,
# argument reader), or None where the byte is not an opcode
_BY_BYTE: list = [(OPCODE_TABLE[b][1], *_argument(OPCODE_TABLE[b][0])) if b in OPCODE_TABLE else None
                  for b in range(256)]


def load(data: Any, *, start: int = 0, persistent_load: Optional[Callable] = None,
         limits: Limits = Limits(), reader: str = "bytes", strict: bool = True,
         persistent_ids: bool = True) -> PickleResult:
    """Run one pickle from `data[start:]` as data; nothing is imported or called.

    `persistent_load(pid)` maps persistent ids (torch: ``('storage', storage_type,
    key, location, numel)``); by default they become `StorageRef` records, and with
    ``persistent_ids=False`` they fail, as in a loader that has no persistent_load.
    `reader` is how the bytes reach the unpickler (`READERS`); `strict` decides
    whether a refusal or a frame anomaly raises (reading) or is recorded (scanning).

    >>> import pickle
    >>> r = load(pickle.dumps([1, "a"]) + b"trailing")
    >>> r.value, r.end
    ([1, 'a'], 22)
    """
    m = _Machine(data, start, persistent_load, limits, reader, strict, persistent_ids)
    try:
        end = m.run()
    except PickleError as e:
        # a scan still reports what the pickle named before it went wrong
        e.opcode, e.offset, e.globals, e.findings = m.op_name, m.op_pos, m.globals, m.findings
        e.framed = m.framed
        raise
    return PickleResult(m.value, m.globals, end, m.findings, m.storages, m.refusals, m.anomalies)


def load_all(data: Any, *, persistent_load: Optional[Callable] = None,
             limits: Limits = Limits(), max_pickles: int = 64) -> list:
    """Every pickle in `data`, back to back (the legacy torch format holds five).

    Stops at the end of the data; a trailing part that is not a pickle raises PickleError.
    """
    out: list = []
    pos = 0
    n = len(data)
    while pos < n and len(out) < max_pickles:
        r = load(data, start=pos, persistent_load=persistent_load, limits=limits)
        out.append(r)
        pos = r.end
    return out
