"""A corpus of hostile checkpoints, written opcode by opcode; nothing here is ever loaded.

Every item carries a canary: a path that the payload would create if a loader
executed it (``touch CANARY``, ``open(CANARY, "w")``, a socket bound there, ...).
A few opcode-level patterns (NEWOBJ on a class whose ``__new__`` alone does
nothing, EXT codes that no registry maps) would create it only in a process that
set up the rest; they are there because scanners must flag the opcode regardless.

The pickles are emitted by `Pickle`, a small writer of `pickletools` opcodes for
protocols 0 to 5; `pickle.dumps` is used only for benign parts (the legacy
magic number, a benign state dict), never on a malicious object.

    >>> items = make_corpus(tmp_path)
    >>> items[0].name, items[0].expect
    ('p0_os_system', 'os.system')
"""

from __future__ import annotations

import io
import marshal
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional

from tests.files import torch_save_bytes

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class CorpusItem(NamedTuple):
    """One hostile file: the global a scan must flag, and where (member, offset) it must say."""

    name: str
    path: Path
    canary: Path
    expect: str                      # qualname of a global graded malicious
    member: Optional[str] = None     # the finding's member (None: the file itself)
    offset: Optional[int] = None     # the opcode's offset within member/file (None: not checked)
    protocol: Optional[int] = None


# --- a pickle writer -------------------------------------------------------------------

class G(NamedTuple):
    """A global, as GLOBAL (protocols 0-3) or STACK_GLOBAL (4-5)."""

    module: str
    name: str


class Call(NamedTuple):
    """func(*args) through REDUCE."""

    func: Any
    args: tuple


class Raw(NamedTuple):
    """Opcodes given as they are (for INST, OBJ, NEWOBJ, EXT, BUILD patterns)."""

    data: bytes
    marks: dict = {}


class Pickle:
    """Emit a pickle program for `protocol`; `offsets[qualname]` is where its global opcode lies."""

    def __init__(self, protocol: int) -> None:
        self.protocol = protocol
        self.body = bytearray()
        self.marks: dict[str, int] = {}

    # values
    def emit(self, x: Any) -> "Pickle":
        if isinstance(x, G):
            self.global_(x.module, x.name)
        elif isinstance(x, Call):
            self.emit(x.func)
            self.tuple_(x.args)
            self.op(b"R")
        elif isinstance(x, Raw):
            for name, off in x.marks.items():
                self.marks.setdefault(name, len(self.body) + off)
            self.op(x.data)
        elif isinstance(x, str):
            self.str_(x)
        elif isinstance(x, bytes):
            self.bytes_(x)
        elif isinstance(x, bool) or x is None:
            self.op({None: b"N", True: b"I01\n", False: b"I00\n"}[x])
        elif isinstance(x, int):
            self.op(b"I%d\n" % x if self.protocol == 0 else b"J" + struct.pack("<i", x))
        elif isinstance(x, tuple):
            self.tuple_(x)
        elif isinstance(x, list):
            self.op(b"(")
            for item in x:
                self.emit(item)
            self.op(b"l")
        elif isinstance(x, dict):
            self.op(b"(")
            for k, v in x.items():
                self.emit(k)
                self.emit(v)
            self.op(b"d")
        else:
            raise TypeError(type(x))
        return self

    def op(self, data: bytes) -> None:
        self.body += data

    def global_(self, module: str, name: str) -> None:
        qual = f"{module}.{name}"
        if self.protocol >= 4:
            self.str_(module)
            self.str_(name)
            self.marks.setdefault(qual, len(self.body))
            self.op(b"\x93")
        else:
            self.marks.setdefault(qual, len(self.body))
            self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def str_(self, s: str) -> None:
        raw = s.encode("utf-8")
        if self.protocol == 0:
            self.op(b"S" + repr(s).encode("ascii") + b"\n")  # as Python 2 wrote str
        elif self.protocol >= 4 and len(raw) < 256:
            self.op(b"\x8c" + bytes([len(raw)]) + raw)
        else:
            self.op(b"X" + struct.pack("<I", len(raw)) + raw)

    def bytes_(self, b: bytes) -> None:
        if self.protocol >= 3:
            self.op(b"B" + struct.pack("<I", len(b)) + b)
        else:  # how Python writes bytes for protocols 0-2: _codecs.encode(latin-1 text)
            self.emit(Call(G("_codecs", "encode"), (b.decode("latin-1"), "latin1")))

    def tuple_(self, items: tuple) -> None:
        self.op(b"(")
        for item in items:
            self.emit(item)
        self.op(b"t")

    def done(self, *, frame: bool = True) -> tuple[bytes, dict]:
        """The pickle's bytes and its global offsets (from the pickle's first byte)."""
        body = bytes(self.body) + b"."
        head = b""
        if self.protocol >= 2:
            head = b"\x80" + bytes([self.protocol])
        if self.protocol >= 4 and frame:
            head += b"\x95" + struct.pack("<Q", len(body))
        return head + body, {k: v + len(head) for k, v in self.marks.items()}


def program(protocol: int, *values: Any, frame: bool = True) -> tuple[bytes, dict]:
    """A pickle whose result is the last of `values` (earlier ones are popped: their calls run)."""
    p = Pickle(protocol)
    for i, v in enumerate(values):
        p.emit(v)
        if i < len(values) - 1:
            p.op(b"0")  # POP
    return p.done(frame=frame)


# --- containers made by hand ----------------------------------------------------------------

def torch_zip(data_pkl: bytes, *, prefix: str = "archive", extra: tuple = ()) -> bytes:
    """A zip laid out as torch.save writes it (stored members under one prefix)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        for name, content in extra:
            z.writestr(name, content)
        z.writestr(f"{prefix}/byteorder", b"little")
        z.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


def benign_pickle() -> bytes:
    return pickle.dumps({"epoch": 3, "lr": 0.1}, protocol=2)


def legacy_file(main: bytes, sys_info: Optional[bytes] = None) -> tuple[bytes, int]:
    """A legacy torch file around `main`; returns it and the offset of `main` in it."""
    head = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    info = sys_info if sys_info is not None else pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}},
        protocol=2)
    return head + info + main + pickle.dumps([], protocol=2), len(head) + len(info)


def legacy_tar(main: bytes) -> bytes:
    buf = io.BytesIO()
    members = [("sys_info", pickle.dumps({"protocol_version": 1000, "little_endian": True}, protocol=2)),
               ("pickle", main), ("tensors", pickle.dumps(0, protocol=2)),
               ("storages", pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2))]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def npy_object(pickled: bytes) -> tuple[bytes, int]:
    """An npy file of an object array whose data is `pickled`; returns it and the data offset."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    pad = 64 - (10 + len(header) + 1) % 64
    text = (header + " " * pad + "\n").encode("latin-1")
    head = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    return head + pickled, len(head)


def zip_of(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def malicious_torch_file(path: "Path | str", canary: "Path | str") -> None:
    """A real torch.save zip of {"w": arange(6).reshape(2, 3)} whose data.pkl also asks for
    os.system(touch canary): one more SETITEM before STOP."""
    import torch

    source = zipfile.ZipFile(io.BytesIO(torch_save_bytes({"w": torch.arange(6.0).reshape(2, 3)})))
    command = f"touch {canary}".encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.endswith(b"s.")  # ... SETITEM STOP: add one more item before STOP
                evil = (b"X" + struct.pack("<I", 4) + b"evil" + b"cposix\nsystem\n"
                        + b"X" + struct.pack("<I", len(command)) + command + b"\x85R" + b"s")
                data = data[:-1] + evil + b"."
            out.writestr(info.filename, data)


# --- the corpus ----------------------------------------------------------------------------

def make_corpus(directory: "Path | str") -> list[CorpusItem]:
    """Write every hostile pattern under `directory`; canaries go to `directory/canaries/`."""
    directory = Path(directory)
    (directory / "canaries").mkdir(parents=True, exist_ok=True)
    items: list[CorpusItem] = []

    def add(name: str, data: bytes, expect: str, member: Optional[str] = None,
            offset: Optional[int] = None, protocol: Optional[int] = None) -> None:
        path = directory / f"{name}.bin"
        path.write_bytes(data)
        items.append(CorpusItem(name, path, canary(name), expect, member, offset, protocol))

    def canary(name: str) -> Path:
        return directory / "canaries" / name

    def touch(name: str) -> str:
        return f"touch {canary(name)}"

    def py(name: str) -> str:
        return f"open({str(canary(name))!r}, 'w').close()"

    def simple(name: str, protocol: int, value: Any, expect: str, **kwargs: Any) -> None:
        data, marks = program(protocol, value, **kwargs)
        add(name, data, expect, None, marks[expect], protocol)

    # code execution, protocols 0-5
    simple("p0_os_system", 0, Call(G("os", "system"), (touch("p0_os_system"),)), "os.system")
    simple("p1_posix_system", 1, Call(G("posix", "system"), (touch("p1_posix_system"),)), "posix.system")
    simple("p2_subprocess_popen", 2,
           Call(G("subprocess", "Popen"), (["touch", str(canary("p2_subprocess_popen"))],)),
           "subprocess.Popen")
    simple("p3_subprocess_check_output", 3,
           Call(G("subprocess", "check_output"), (["touch", str(canary("p3_subprocess_check_output"))],)),
           "subprocess.check_output")
    simple("p4_builtins_exec", 4, Call(G("builtins", "exec"), (py("p4_builtins_exec"),)), "builtins.exec")
    simple("p5_builtins_eval", 5, Call(G("builtins", "eval"), (py("p5_builtins_eval"),)), "builtins.eval")
    data, marks = program(0, Call(G("__builtin__", "eval"), (py("p0_py2_builtin_eval"),)))
    add("p0_py2_builtin_eval", data, "builtins.eval", None, marks["__builtin__.eval"], 0)
    simple("p2_compile_functiontype", 2, Call(Call(G("types", "FunctionType"), (
        Call(G("builtins", "compile"), (py("p2_compile_functiontype"), "<x>", "exec")), {})), ()),
        "types.FunctionType")
    simple("p3_import_getattr", 3, Call(Call(G("builtins", "getattr"), (
        Call(G("builtins", "__import__"), ("os",)), "system")), (touch("p3_import_getattr"),)),
        "builtins.__import__")
    simple("p1_open_write", 1, Call(G("builtins", "open"), (str(canary("p1_open_write")), "w")),
           "builtins.open")
    simple("p4_io_open", 4, Call(G("io", "open"), (str(canary("p4_io_open")), "w")), "io.open")
    simple("p2_shutil_copyfile", 2,
           Call(G("shutil", "copyfile"), ("/etc/hostname", str(canary("p2_shutil_copyfile")))),
           "shutil.copyfile")
    simple("p4_webbrowser", 4, Call(Call(G("builtins", "getattr"), (
        Call(G("webbrowser", "get"), (f"{touch('p4_webbrowser')} %s",)), "open")), ("x",)), "webbrowser.get")
    simple("p5_socket_bind", 5, Call(Call(G("builtins", "getattr"), (
        Call(G("socket", "socket"), (1, 1)), "bind")), (str(canary("p5_socket_bind")),)), "socket.socket")
    simple("p2_runpy_run_code", 2, Call(G("runpy", "_run_code"), (py("p2_runpy_run_code"), {})),
           "runpy._run_code")
    simple("p3_importlib", 3, Call(Call(G("builtins", "getattr"), (
        Call(G("importlib", "import_module"), ("os",)), "system")), (touch("p3_importlib"),)),
        "importlib.import_module")
    simple("p4_pkgutil_resolve_name", 4, Call(Call(G("pkgutil", "resolve_name"), ("os:system",)),
                                              (touch("p4_pkgutil_resolve_name"),)), "pkgutil.resolve_name")
    simple("p3_numpy_runstring", 3, Call(G("numpy.testing._private.utils", "runstring"),
                                         (py("p3_numpy_runstring"), {})),
           "numpy.testing._private.utils.runstring")
    simple("p2_ctypes_cdll", 2, Call(Call(G("builtins", "getattr"), (
        Call(G("ctypes", "CDLL"), (None,)), "system")), (touch("p2_ctypes_cdll").encode(),)), "ctypes.CDLL")
    simple("p3_marshal_functiontype", 3, Call(Call(G("types", "FunctionType"), (
        Call(G("marshal", "loads"), (marshal.dumps(compile(py("p3_marshal_functiontype"), "<x>", "exec")),)),
        {})), ()), "marshal.loads")

    # dotted names resolved through other modules (STACK_GLOBAL does getattr per component)
    simple("p4_dotted_pathlib_os_system", 4,
           Call(G("pathlib", "os.system"), (touch("p4_dotted_pathlib_os_system"),)), "pathlib.os.system")
    simple("p5_dotted_torch_serialization", 5, Call(G("torch", "serialization.os.system"),
                                                    (touch("p5_dotted_torch_serialization"),)),
           "torch.serialization.os.system")
    simple("p4_dotted_pathlib_touch", 4, Call(G("pathlib", "Path.touch"), (
        Call(G("pathlib", "PosixPath"), (str(canary("p4_dotted_pathlib_touch")),)),)), "pathlib.Path.touch")

    # wrappers: the dangerous call happens inside another callable
    simple("p4_operator_attrgetter", 4, Call(Call(Call(G("operator", "attrgetter"), ("system",)), (
        Call(G("importlib", "import_module"), ("os",)),)), (touch("p4_operator_attrgetter"),)),
        "operator.attrgetter")
    simple("p5_operator_methodcaller", 5, Call(Call(G("operator", "methodcaller"), (
        "system", touch("p5_operator_methodcaller"))), (Call(G("builtins", "__import__"), ("os",)),)),
        "operator.methodcaller")
    simple("p3_functools_partial", 3, Call(Call(G("functools", "partial"), (
        G("os", "system"), touch("p3_functools_partial"))), ()), "functools.partial")

    # opcode families: INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4, BUILD with __setstate__
    cmd = touch("p0_inst").encode()
    data = b"(S'" + cmd + b"'\nios\nsystem\n."
    add("p0_inst", data, "os.system", None, data.index(b"ios"), 0)

    p = Pickle(1)
    p.op(b"(")
    p.emit(G("subprocess", "getoutput"))
    p.emit(touch("p1_obj"))
    p.op(b"o")
    data, marks = p.done()
    add("p1_obj", data, "subprocess.getoutput", None, marks["subprocess.getoutput"], 1)

    for proto, opcode, name in ((2, b"\x81", "p2_newobj"), (4, b"\x92", "p4_newobj_ex")):
        p = Pickle(proto)
        p.emit(G("subprocess", "Popen"))
        p.emit((["touch", str(canary(name))],))
        if opcode == b"\x92":
            p.emit({})
        p.op(opcode)
        data, marks = p.done()
        add(name, data, "subprocess.Popen", None, marks["subprocess.Popen"], proto)

    for proto, opcode, code, name in ((2, b"\x82", struct.pack("<B", 1), "p2_ext1"),
                                      (3, b"\x83", struct.pack("<H", 0x1234), "p3_ext2"),
                                      (5, b"\x84", struct.pack("<i", 0x123456), "p5_ext4")):
        p = Pickle(proto)
        p.emit(Raw(opcode + code))
        p.tuple_((touch(name),))
        p.op(b"R")
        data, _ = p.done()
        value = struct.unpack("<i", code.ljust(4, b"\0"))[0]
        add(name, data, f"copyreg.extension.{value}", None, data.index(opcode), proto)

    for proto, cls, name in ((2, G("argparse", "Namespace"), "p2_build_setstate_namespace"),
                             (3, G("collections", "OrderedDict"), "p3_build_setstate_ordereddict")):
        # obj.__dict__["__setstate__"] = os.system, then BUILD calls obj.__setstate__(command)
        p = Pickle(proto)
        p.emit(cls)
        p.op(b")\x81")  # EMPTY_TUPLE, NEWOBJ
        p.emit({"__setstate__": G("os", "system")})
        p.op(b"b")
        p.emit(touch(name))
        p.op(b"b")
        data, marks = p.done()
        add(name, data, "os.system", None, marks["os.system"], proto)

    # nested deserialization: the inner payload is itself hostile
    inner, inner_marks = program(0, Call(G("os", "system"), (touch("p4_pickle_loads_nested"),)))
    simple("p4_pickle_loads_nested", 4, Call(G("pickle", "loads"), (inner,)), "pickle.loads")
    inner, _ = program(2, Call(G("os", "system"), (touch("p4_discarded_loads"),)))
    data, marks = program(4, Call(G("pickle", "loads"), (inner,)), {"weights": 1})
    add("p4_discarded_loads", data, "pickle.loads", None, marks["pickle.loads"], 4)
    inner_zip = torch_zip(program(2, Call(G("os", "system"), (touch("p2_torch_load_from_bytes"),)))[0])
    simple("p2_torch_load_from_bytes", 2, Call(G("torch.storage", "_load_from_bytes"), (inner_zip,)),
           "torch.storage._load_from_bytes")
    inner_legacy, _ = legacy_file(program(2, Call(G("os", "system"), (touch("p3_torch_load_bytesio"),)))[0])
    simple("p3_torch_load_bytesio", 3,
           Call(G("torch", "load"), (Call(G("io", "BytesIO"), (inner_legacy,)),)), "torch.load")

    # where pickles hide in files
    first = benign_pickle()
    evil, marks = program(2, Call(G("os", "system"), (touch("p2_after_stop"),)))
    add("p2_after_stop", first + evil, "os.system", None, len(first) + marks["os.system"], 2)

    evil, marks = program(2, Call(G("os", "system"), (touch("polyglot_before_zip"),)))
    add("polyglot_before_zip", evil + torch_zip(benign_pickle()), "os.system", None, marks["os.system"], 2)

    evil, marks = program(2, Call(G("os", "system"), (touch("torch_zip_data_pkl"),)))
    add("torch_zip_data_pkl", torch_zip(evil), "os.system", "archive/data.pkl", marks["os.system"], 2)

    evil, marks = program(2, Call(G("posix", "system"), (touch("torch_zip_other_pkl"),)))
    add("torch_zip_other_pkl", torch_zip(benign_pickle(), extra=(("archive/constants.pkl", evil),)),
        "posix.system", "archive/constants.pkl", marks["posix.system"], 2)

    evil, marks = program(2, Call(G("os", "system"), (touch("torch_zip_duplicate_data_pkl"),)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", benign_pickle())
        z.writestr("archive/byteorder", b"little")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": exactly the point
            z.writestr("archive/data.pkl", evil)
    add("torch_zip_duplicate_data_pkl", buf.getvalue(), "os.system", "archive/data.pkl",
        marks["os.system"], 2)

    evil, marks = program(2, Call(G("os", "system"), (touch("torch_zip_name_mismatch"),)))
    data = bytearray(torch_zip(benign_pickle(), extra=(("archive/xata.pkl", evil),)))
    # the local header of xata.pkl (its first mention) says data.pkl: readers that walk local
    # headers see a second data.pkl, readers of the central directory see xata.pkl
    at = data.index(b"archive/xata.pkl")
    data[at:at + len(b"archive/data.pkl")] = b"archive/data.pkl"
    add("torch_zip_name_mismatch", bytes(data), "os.system", "archive/xata.pkl", marks["os.system"], 2)

    evil, marks = program(2, Call(G("os", "system"), (touch("legacy_main"),)))
    data, at = legacy_file(evil)
    add("legacy_main", data, "os.system", None, at + marks["os.system"], 2)

    evil, marks = program(2, Call(G("os", "system"), (touch("legacy_sys_info"),)))
    data, at = legacy_file(pickle.dumps({}, protocol=2), sys_info=evil)
    add("legacy_sys_info", data, "os.system", None, at - len(evil) + marks["os.system"], 2)

    evil, marks = program(2, Call(G("os", "system"), (touch("legacy_tar"),)))
    add("legacy_tar", legacy_tar(evil), "os.system", "pickle", marks["os.system"], 2)

    evil, marks = program(3, Call(G("os", "system"), (touch("npy_object_array"),)))
    data, at = npy_object(evil)
    add("npy_object_array", data, "os.system", None, at + marks["os.system"], 3)

    evil, marks = program(3, Call(G("subprocess", "Popen"), (["touch", str(canary("npz_member"))],)))
    npy, at = npy_object(evil)
    add("npz_member", zip_of([("weights.npy", np_zero_npy()), ("arr_1.npy", npy)], zipfile.ZIP_DEFLATED),
        "subprocess.Popen", "arr_1.npy", at + marks["subprocess.Popen"], 3)

    evil, marks = program(2, Call(G("os", "system"), (touch("nested_zip_in_zip"),)))
    add("nested_zip_in_zip", zip_of([("readme.txt", b"weights inside"), ("inner.pt", torch_zip(evil))]),
        "os.system", "inner.pt > archive/data.pkl", marks["os.system"], 2)
    return items


def np_zero_npy() -> bytes:
    """A benign float32 npy array, written by hand (2 zeros)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
    pad = 64 - (10 + len(header) + 1) % 64
    text = (header + " " * pad + "\n").encode("latin-1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(8)
