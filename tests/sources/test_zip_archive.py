"""The zip reader: archives made by torch, numpy and zipfile read right (zero-copy, aligned);
zip tricks come out as findings; malformed and hostile archives are a SourceError, bounded."""

from __future__ import annotations

import gzip
import io
import mmap
import pickle
import struct
import tarfile
import tracemalloc
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from safeckpt.errors import SafeckptError, SourceError
from safeckpt.sources import zip_archive
from safeckpt.sources.zip_archive import FINDING_KINDS, ZipArchive, ZipMember, find_zip, is_zip

from tests.files import torch_save_bytes

torch = pytest.importorskip("torch")


# --- archives made by the real libraries -------------------------------------

def zipfile_bytes(members: dict, *, compression=zipfile.ZIP_STORED, comment: bytes = b"",
                  force_zip64: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.comment = comment
        for name, content in members.items():
            with archive.open(name, "w", force_zip64=force_zip64) as f:
                f.write(content)
    return buffer.getvalue()


def kinds(archive: ZipArchive) -> list[str]:
    return sorted(f.kind for f in archive.findings)


@pytest.fixture(scope="module")
def small_torch() -> bytes:
    return torch_save_bytes({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
                        "b": torch.ones(5, dtype=torch.bfloat16), "step": 3})


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_any_buffer_of_the_whole_file(small_torch, wrap):
    archive = ZipArchive(wrap(small_torch), "buf.pt")
    assert bytes(archive.read(archive.names()[0].split("/")[0] + "/byteorder")) == b"little"


def test_torch_zip_members_are_located_zero_copy_and_aligned(tmp_path):
    tensors = {"w": torch.randn(7, 5), "h": torch.arange(9, dtype=torch.float16), "i": torch.arange(4)}
    path = tmp_path / "model.pt"
    torch.save(tensors, path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        archive = ZipArchive(mapping, str(path))
        prefix = archive.names()[0].split("/")[0]
        assert f"{prefix}/data.pkl" in archive.names() and f"{prefix}/version" in archive.names()
        assert bytes(archive.read(f"{prefix}/byteorder")) == b"little"
        records = [m for m in archive.members if "/data/" in m.name]
        assert len(records) == 3 and all(m.data_offset % 64 == 0 and m.method == 0 for m in records)
        # torch numbers storages in pickling order (dict order here)
        for key, tensor in zip(["0", "1", "2"], tensors.values()):
            view = archive.read(f"{prefix}/data/{key}")
            assert bytes(view) == tensor.numpy().tobytes()
            assert view.obj is mapping  # a view of the mapping, not a copy
            view.release()
        assert archive.findings == [] and archive.check_crcs() == [] and archive.start == 0
        assert archive.member(f"{prefix}/data/0") == records[0]
        mapping.close()  # nothing of ours holds the mapping open


def test_numpy_savez_and_savez_compressed(tmp_path):
    arrays = {"a": np.arange(100, dtype=np.float64).reshape(10, 10), "b": np.array([1, 2, 3], np.int8)}
    for save, method in ((np.savez, 0), (np.savez_compressed, 8)):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        archive = ZipArchive(path.read_bytes(), str(path))
        assert archive.names() == ["a.npy", "b.npy"]
        for name, array in arrays.items():
            member = archive.member(f"{name}.npy")
            assert member.method == method
            expected = io.BytesIO()
            np.lib.format.write_array(expected, array, allow_pickle=False)
            assert bytes(archive.read(member)) == expected.getvalue()
            assert archive.crc_ok(member)
        assert archive.findings == [] and archive.check_crcs() == []


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("force_zip64", [False, True])
def test_zipfile_archives_with_comments_and_forced_zip64(compression, force_zip64):
    members = {"x.bin": bytes(range(256)) * 40, "empty": b"", "dir/ünï.txt": "héllo".encode()}
    data = zipfile_bytes(members, compression=compression, comment=b"made by zipfile",
                         force_zip64=force_zip64)
    archive = ZipArchive(data, "z.zip")
    assert archive.names() == list(members) and archive.comment == b"made by zipfile"
    reference = zipfile.ZipFile(io.BytesIO(data))
    for name, content in members.items():
        assert bytes(archive.read(name)) == content
        member, info = archive.member(name), reference.getinfo(name)
        assert (member.header_offset, member.crc32, member.size) == \
            (info.header_offset, info.CRC, info.file_size)
    assert archive.findings == [] and archive.check_crcs() == []


def test_member_comments_are_skipped():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("a.txt")
        info.comment = b"a member comment"
        archive.writestr(info, b"aaa")
        archive.writestr("b.txt", b"bbb")
    archive = ZipArchive(buffer.getvalue(), "c.zip")
    assert [bytes(archive.read(n)) for n in archive.names()] == [b"aaa", b"bbb"]


def test_zip64_end_records_from_more_than_65535_members():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(65537):
            archive.writestr(f"m{i}", b"%d" % i)
    data = buffer.getvalue()
    assert data[-22 - 20:-22][:4] == b"PK\x06\x07"  # zipfile wrote the ZIP64 locator and record
    archive = ZipArchive(data, "big.zip")
    assert len(archive.names()) == 65537 and archive.findings == []
    assert bytes(archive.read("m65536")) == b"65536"


def test_empty_archive():
    data = zipfile_bytes({})
    assert len(data) == 22 and is_zip(data)
    archive = ZipArchive(data, "empty.zip")
    assert archive.members == [] and archive.names() == [] and archive.findings == [] and archive.start == 0
    assert find_zip(data) == 0
    with pytest.raises(SourceError, match="no member 'x'"):
        archive.member("x")


def test_twenty_thousand_members():
    data = torch_save_bytes({f"layer{i}.weight": torch.zeros(2) for i in range(20_000)})
    archive = ZipArchive(data, "many.pt")
    assert len(archive.names()) == 20_006 and archive.findings == []
    assert bytes(archive.read(archive.names()[-3])) == bytes(8)


def test_is_zip_and_find_zip(small_torch):
    assert is_zip(small_torch) and is_zip(b"PK\x05\x06" + bytes(18))
    assert not is_zip(b"\x80\x02}q\x00.") and not is_zip(b"")
    assert find_zip(small_torch) == 0
    assert find_zip(b"") is None and find_zip(pickle.dumps({"a": 1})) is None
    assert find_zip(bytes(range(256)) * 100) is None


# --- polyglots ------------------------------------------------------------------

def test_pickle_in_front_of_a_torch_zip_is_found_and_the_zip_still_reads(small_torch):
    front = pickle.dumps({"looks": "harmless"}, protocol=2)
    polyglot = front + small_torch
    assert not is_zip(polyglot) and find_zip(polyglot) == len(front)
    archive = ZipArchive(polyglot, "poly.pt")
    assert archive.start == len(front)
    [finding] = archive.findings
    assert (finding.kind, finding.offset) == ("prepended-data", 0) and str(len(front)) in finding.detail
    prefix = archive.names()[0].split("/")[0]
    assert bytes(archive.read(f"{prefix}/byteorder")) == b"little"
    plain = ZipArchive(small_torch, "plain.pt")
    assert [m.data_offset - len(front) for m in archive.members] == [m.data_offset for m in plain.members]
    assert archive.check_crcs() == []


def test_archive_appended_by_zipfile_with_absolute_offsets(tmp_path):
    path = tmp_path / "stub.bin"
    stub = b"#!/bin/sh\necho a stub in front\n" * 3
    path.write_bytes(stub)
    with zipfile.ZipFile(path, "a") as archive:  # zipfile appends to a non-zip, offsets absolute
        archive.writestr("payload.txt", b"payload")
    archive = ZipArchive(path.read_bytes(), str(path))
    assert archive.start == len(stub) and kinds(archive) == ["prepended-data"]
    assert bytes(archive.read("payload.txt")) == b"payload"


# --- a hand-made writer that can lie ----------------------------------------------

LOCAL = struct.Struct("<IHHHHHIIIHH")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
EOCD = struct.Struct("<IHHHHIIH")


@dataclass
class Entry:
    name: bytes
    content: bytes = b""
    method: int = 0
    flags: int = 0
    local_name: Optional[bytes] = None
    local: dict = field(default_factory=dict)     # overrides: flags, method, crc, csize, usize
    central: dict = field(default_factory=dict)   # overrides: flags, method, crc, csize, usize, offset
    payload: Optional[bytes] = None               # the stored bytes, if not the (compressed) content
    central_extra: bytes = b""


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def build_zip(entries: list[Entry], *, comment: bytes = b"", prefix: bytes = b"", trailing: bytes = b"",
              between: bytes = b"", count: Optional[int] = None, cd_size: Optional[int] = None,
              cd_offset: Optional[int] = None) -> bytes:
    body, directory = b"", b""
    for e in entries:
        payload = e.payload if e.payload is not None else deflate(e.content) if e.method == 8 else e.content
        fields = dict(flags=e.flags, method=e.method, crc=zlib.crc32(e.content), csize=len(payload),
                      usize=len(e.content))
        local, central = {**fields, **e.local}, {**fields, "offset": len(body), **e.central}
        local_name = e.local_name if e.local_name is not None else e.name
        body += LOCAL.pack(0x04034B50, 20, local["flags"], local["method"], 0, 0, local["crc"],
                           local["csize"], local["usize"], len(local_name), 0) + local_name + payload
        directory += CENTRAL.pack(0x02014B50, 20, 20, central["flags"], central["method"], 0, 0,
                                  central["crc"], central["csize"], central["usize"], len(e.name),
                                  len(e.central_extra), 0, 0, 0, 0, central["offset"])
        directory += e.name + e.central_extra
    n = len(entries) if count is None else count
    end = EOCD.pack(0x06054B50, 0, 0, n, n, len(directory) if cd_size is None else cd_size,
                    len(body) if cd_offset is None else cd_offset, len(comment))
    return prefix + body + directory + between + end + comment + trailing


def only_kind(data: bytes, kind: str) -> list:
    archive = ZipArchive(data, "hostile.zip")
    found = [f for f in archive.findings if f.kind == kind]
    assert found, (kind, archive.findings)
    assert kind in FINDING_KINDS and all(f.detail for f in found)
    return found


def test_hand_made_archive_is_clean_and_readable():
    data = build_zip([Entry(b"a", b"alpha"), Entry(b"b", b"beta" * 100, method=8)], comment=b"hi")
    archive = ZipArchive(data, "ok.zip")
    assert archive.findings == [] and archive.check_crcs() == []
    assert zipfile.ZipFile(io.BytesIO(data)).read("b") == bytes(archive.read("b")) == b"beta" * 100


# --- findings -----------------------------------------------------------------------

def test_duplicate_names():
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns, and writes it anyway
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("archive/data.pkl", b"first")
            archive.writestr("archive/data.pkl", b"second")
    [finding] = only_kind(buffer.getvalue(), "duplicate-name")
    archive = ZipArchive(buffer.getvalue(), "dup.zip")
    assert finding.member == "archive/data.pkl" and len(archive.members) == 2
    assert bytes(archive.read("archive/data.pkl")) == b"first"  # member() is the first entry


def test_name_mismatch_between_local_and_central_headers():
    data = build_zip([Entry(b"archive/data.pkl", b"x", local_name=b"archive/evil.pkl")])
    [finding] = only_kind(data, "name-mismatch")
    assert "archive/evil.pkl" in finding.detail and finding.member == "archive/data.pkl"


def test_header_mismatch_on_method():
    data = build_zip([Entry(b"m", b"content", local={"method": 8})])
    only_kind(data, "header-mismatch")


@pytest.mark.parametrize("flags", [0x0001, 0x0041, 0x2000])
def test_encrypted_members(flags):
    data = build_zip([Entry(b"secret", b"0123456789ab" + b"cipher", flags=flags)])
    only_kind(data, "encrypted")
    archive = ZipArchive(data, "enc.zip")
    with pytest.raises(SourceError, match="encrypted"):
        archive.read("secret")
    assert archive.check_crcs() == []  # skipped, not misreported


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_unsupported_methods_from_zipfile(compression):
    data = zipfile_bytes({"w.bin": b"weights" * 50}, compression=compression)
    [finding] = only_kind(data, "unsupported-method")
    assert finding.member == "w.bin"
    with pytest.raises(SourceError, match="method"):
        ZipArchive(data, "m.zip").read("w.bin")


def test_trailing_data_and_hidden_data():
    data = zipfile_bytes({"a": b"a"}, comment=b"c") + b"appended junk"
    [finding] = only_kind(data, "trailing-data")
    assert finding.offset == len(data) - len(b"appended junk")
    assert bytes(ZipArchive(data, "t.zip").read("a")) == b"a"
    hidden = build_zip([Entry(b"a", b"a")], between=b"HIDDEN PAYLOAD")
    only_kind(hidden, "hidden-data")


def test_overlapping_members():
    # Two directory entries for one local header (the non-recursive zip bomb shape).
    shared = build_zip([Entry(b"a", b"x" * 100), Entry(b"a2", b"y", central={"offset": 0})])
    found = only_kind(shared, "overlapping-members")
    assert any("'a'" in f.detail for f in found)
    # Member data that runs into the central directory.
    data = build_zip([Entry(b"a", b"x" * 10, central={"csize": 30, "usize": 30})])
    only_kind(data, "overlapping-members")


def test_size_mismatch():
    stored_lie = build_zip([Entry(b"a", b"0123456789", central={"usize": 99})])
    only_kind(stored_lie, "size-mismatch")
    with pytest.raises(SourceError, match="ambiguous"):
        ZipArchive(stored_lie, "s.zip").read("a")
    local_lie = build_zip([Entry(b"a", b"x" * 50, method=8, local={"usize": 7})])
    [finding] = only_kind(local_lie, "size-mismatch")
    assert "local header" in finding.detail
    # With a data descriptor (flag bit 3) the local sizes are zero by design: no finding.
    descriptor = build_zip([Entry(b"a", b"x" * 50, flags=8, local={"usize": 0, "csize": 0, "crc": 0})])
    assert ZipArchive(descriptor, "d.zip").findings == []


def test_nested_archives():
    inner = zipfile_bytes({"data.pkl": pickle.dumps(1)})
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("x")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    data = zipfile_bytes({"inner.zip": inner, "g.gz": gzip.compress(b"hello"), "t.tar": tar.getvalue(),
                          "plain.bin": b"PK but not a zip"})
    found = only_kind(data, "nested-archive")
    assert sorted(f.member for f in found) == ["g.gz", "inner.zip", "t.tar"]
    deflated = zipfile_bytes({"inner.zip": inner}, compression=zipfile.ZIP_DEFLATED)
    [finding] = only_kind(deflated, "nested-archive")
    assert finding.member == "inner.zip"


@pytest.mark.parametrize("name", [b"../../etc/passwd", b"/abs/path", b"C:\\windows\\x", b"a\\b",
                                  b"a\x00b", b"dir/../../up"])
def test_unsafe_names(name):
    only_kind(build_zip([Entry(name, b"x")]), "unsafe-name")


def test_a_name_holding_the_directory_signature():
    data = build_zip([Entry(b"PK\x01\x02inside", b"x"), Entry(b"b", b"y")])
    archive = ZipArchive(data, "sig.zip")
    assert archive.names() == ["PK\x01\x02inside", "b"] and archive.findings == []


def test_entries_the_end_record_does_not_count():
    data = build_zip([Entry(b"counted", b"x"), Entry(b"uncounted.pkl", b"y")], count=1)
    [finding] = only_kind(data, "hidden-data")
    assert "more entries than the end record counts" in finding.detail
    assert ZipArchive(data, "h.zip").names() == ["counted"]


def test_an_empty_deflated_member_without_data():
    archive = ZipArchive(build_zip([Entry(b"e", b"", method=8, payload=b"")]), "e.zip")
    assert bytes(archive.read("e")) == b"" and archive.check_crcs() == []


def test_names_that_are_fine():
    archive = ZipArchive(build_zip([Entry(b"a..b/c", b"x"), Entry(b"archive/.data/id", b"y")]), "ok.zip")
    assert archive.findings == []


def test_invalid_utf8_name_is_reported_and_readable():
    data = build_zip([Entry(b"bad\xff\xfe", b"x", flags=0x800)])
    only_kind(data, "unsafe-name")
    archive = ZipArchive(data, "u.zip")
    assert bytes(archive.read(archive.names()[0])) == b"x"


def test_cp437_names_without_the_utf8_flag():
    archive = ZipArchive(build_zip([Entry(b"caf\x82", b"x")]), "cp.zip")
    assert archive.names() == ["café"]


def test_bad_crc_only_from_check_crcs():
    data = bytearray(zipfile_bytes({"a": b"the original bytes", "b": b"fine"}))
    at = data.index(b"original")
    data[at] ^= 0xFF
    archive = ZipArchive(bytes(data), "crc.zip")
    assert archive.findings == []  # not checked on open
    assert not archive.crc_ok("a") and archive.crc_ok("b")
    [finding] = archive.check_crcs()
    assert (finding.kind, finding.member) == ("bad-crc", "a") and archive.findings == [finding]
    assert archive.check_crcs() == []  # each member is checked once
    wrong = build_zip([Entry(b"d", b"z" * 1000, method=8, central={"crc": 1}, local={"crc": 1})])
    assert [f.kind for f in ZipArchive(wrong, "w.zip").check_crcs()] == ["bad-crc"]


def test_findings_of_one_kind_are_capped():
    entries = [Entry(b"same", b"%d" % i) for i in range(zip_archive.MAX_FINDINGS_PER_KIND + 50)]
    archive = ZipArchive(build_zip(entries), "many.zip")
    duplicates = [f for f in archive.findings if f.kind == "duplicate-name"]
    assert len(duplicates) == zip_archive.MAX_FINDINGS_PER_KIND + 1
    assert "49 more" in duplicates[-1].detail  # 150 entries, 149 of them repeats


# --- malformed archives: SourceError with the path and the offset -------------------

def test_truncated_at_every_cut_point_is_a_source_error(small_torch):
    for cut in range(len(small_torch)):
        with pytest.raises(SourceError, match="cut.pt"):
            ZipArchive(small_torch[:cut], "cut.pt")


def test_front_cut_archives_are_source_errors(small_torch):
    for cut in range(1, len(small_torch), 7):
        with pytest.raises(SourceError):
            ZipArchive(small_torch[cut:], "front.pt")


def test_central_directory_outside_the_file():
    data = build_zip([Entry(b"a", b"a")], cd_offset=10**6)
    with pytest.raises(SourceError, match=r"central directory .* not where") as info:
        ZipArchive(data, "out.zip")
    assert "out.zip" in str(info.value) and "offset" in str(info.value)


def test_local_header_and_data_outside_the_file():
    with pytest.raises(SourceError, match="past the end of the file|outside the file"):
        ZipArchive(build_zip([Entry(b"a", b"a", central={"offset": 10**6})]), "l.zip")
    with pytest.raises(SourceError, match="past the end of the file"):
        ZipArchive(build_zip([Entry(b"a", b"a", central={"csize": 10**6, "usize": 10**6})]), "d.zip")
    with pytest.raises(SourceError, match=r"its data \(90 bytes at offset 31\) runs past the end"):
        ZipArchive(build_zip([Entry(b"a", b"a", central={"csize": 90, "usize": 90})]), "d.zip")
    with pytest.raises(SourceError, match="no local header"):
        ZipArchive(build_zip([Entry(b"a", b"aaaa"), Entry(b"b", b"b", central={"offset": 3})]), "s.zip")


def test_huge_declared_member_counts(monkeypatch):
    with pytest.raises(SourceError, match="holds at most"):
        ZipArchive(build_zip([Entry(b"a", b"a")], count=0xFFFF), "count.zip")
    monkeypatch.setattr(zip_archive, "MAX_MEMBERS", 2)
    with pytest.raises(SourceError, match="more than the limit of 2"):
        ZipArchive(build_zip([Entry(b"%d" % i, b"") for i in range(3)]), "limit.zip")


def test_zip64_end_record_must_agree_with_the_end_record():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(65536):
            archive.writestr(f"{i}", b"")
    data = bytearray(buffer.getvalue())
    record = len(data) - 22 - 20 - 56
    assert data[record:record + 4] == b"PK\x06\x06"
    struct.pack_into("<Q", data, record + 40, 12345)  # central directory size, now a lie
    with pytest.raises(SourceError, match="ZIP64"):
        ZipArchive(bytes(data), "z64.zip")
    struct.pack_into("<Q", data, len(data) - 22 - 20 + 8, 7)  # the locator points nowhere
    data[record:record + 4] = b"XXXX"
    with pytest.raises(SourceError, match="ZIP64 locator"):
        ZipArchive(bytes(data), "z64.zip")


def test_zip64_extra_fields_in_the_central_directory():
    content = b"z" * 300
    wide = struct.pack("<HHQQQ", 0x0001, 24, len(content), len(content), 0)
    padding = struct.pack("<HH", 0x4242, 3) + b"pad"  # another extra field first: found by id, not position
    data = build_zip([Entry(b"z", content, central={"csize": 0xFFFFFFFF, "usize": 0xFFFFFFFF,
                                                      "offset": 0xFFFFFFFF}, central_extra=padding + wide)])
    archive = ZipArchive(data, "z64.zip")
    assert archive.member("z").size == 300 and archive.member("z").header_offset == 0
    assert bytes(archive.read("z")) == content and archive.findings == []
    short = build_zip([Entry(b"z", content, central={"csize": 0xFFFFFFFF, "usize": 0xFFFFFFFF},
                             central_extra=struct.pack("<HHQ", 0x0001, 8, len(content)))])
    with pytest.raises(SourceError, match="too short"):
        ZipArchive(short, "short.zip")
    absurd = build_zip([Entry(b"z", content, central={"usize": 0xFFFFFFFF},
                              central_extra=struct.pack("<HHQ", 0x0001, 8, 2**64 - 1))])
    with pytest.raises(SourceError, match="2\\*\\*63"):
        ZipArchive(absurd, "absurd.zip")


def test_zip64_placeholders_without_the_extra_field():
    data = build_zip([Entry(b"a", b"a", central={"csize": 0xFFFFFFFF})])
    with pytest.raises(SourceError, match="ZIP64 extra field"):
        ZipArchive(data, "p.zip")


def test_multi_disk_archives_are_refused():
    data = bytearray(build_zip([Entry(b"a", b"a")]))
    struct.pack_into("<H", data, len(data) - 22 + 4, 1)
    with pytest.raises(SourceError, match="multi-disk"):
        ZipArchive(bytes(data), "disk.zip")


def test_not_a_zip():
    for data in (b"", b"PK", pickle.dumps(list(range(100))), b"PK\x05\x06"):
        with pytest.raises(SourceError, match="not-a-zip"):
            ZipArchive(data, "not-a-zip")
    with pytest.raises(SourceError):
        ZipArchive("a string", "str")  # type: ignore[arg-type]


def test_an_mmap_can_be_closed_after_an_error(tmp_path, small_torch):
    early = bytearray(small_torch)
    struct.pack_into("<I", early, len(early) - 22 + 16, 10**6)  # central directory offset
    late = bytearray(small_torch)
    second = late.index(b"PK\x01\x02", late.index(b"PK\x01\x02") + 1)
    struct.pack_into("<I", late, second + 42, 1)  # a local header offset, found wrong after the bulk reads
    for data in (early, late):
        path = tmp_path / "bad.pt"
        path.write_bytes(data)
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with pytest.raises(SourceError) as info:
            ZipArchive(mapping, str(path))
        del info  # the traceback must not be what keeps the mapping open either
        mapping.close()


# --- bombs and size lies: bounded memory, SourceError -------------------------------

def test_deflate_bomb_with_a_small_declared_size():
    zeros = bytes(50 << 20)
    bomb = build_zip([Entry(b"bomb", b"", method=8, payload=deflate(zeros),
                            central={"usize": 1000, "crc": zlib.crc32(zeros)},
                            local={"usize": 1000, "crc": zlib.crc32(zeros)})])
    archive = ZipArchive(bomb, "bomb.zip")
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match="more than its declared 1000 bytes"):
            archive.read("bomb")
        [finding] = archive.check_crcs()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert finding.kind == "unreadable" and peak < 20 << 20


def test_deflate_bomb_with_a_huge_declared_size():
    payload = deflate(bytes(1 << 20))
    huge = build_zip([Entry(b"bomb", b"", method=8, payload=payload, central={"usize": 0xFFFFFFF0},
                            local={"usize": 0xFFFFFFF0})])
    archive = ZipArchive(huge, "huge.zip")
    with pytest.raises(SourceError, match="more than deflate can expand"):
        archive.read("bomb")
    with pytest.raises(SourceError, match="more than the limit"):
        archive.read("bomb", max_size=1 << 20)


def test_deflate_stream_shorter_than_declared_or_corrupt():
    short = build_zip([Entry(b"s", b"abc" * 10, method=8, central={"usize": 31}, local={"usize": 31})])
    with pytest.raises(SourceError, match="inflates to 30 bytes but declares 31"):
        ZipArchive(short, "short.zip").read("s")
    corrupt = build_zip([Entry(b"c", b"abc", method=8, payload=b"\xff" * 8)])
    with pytest.raises(SourceError, match="corrupt deflate"):
        ZipArchive(corrupt, "corrupt.zip").read("c")
    cut = deflate(bytes(range(256)) * 64)
    truncated = build_zip([Entry(b"t", bytes(range(256)) * 64, method=8, payload=cut[:len(cut) // 2])])
    with pytest.raises(SourceError, match="ends before its end marker"):
        ZipArchive(truncated, "t.zip").read("t")


def test_explicit_max_size_bounds_stored_members_too(small_torch):
    archive = ZipArchive(small_torch, "m.pt")
    pkl = next(m for m in archive.members if m.name.endswith("data.pkl"))
    with pytest.raises(SourceError, match="larger max_size"):
        archive.read(pkl, max_size=pkl.size - 1)
    assert len(archive.read(pkl, max_size=pkl.size)) == pkl.size


def test_a_forged_member_record_is_bounds_checked(small_torch):
    archive = ZipArchive(small_torch, "f.pt")
    forged = ZipMember("x", 0, len(small_torch) - 4, 100, 100, 0, 0, 0)
    with pytest.raises(SourceError, match="outside the file"):
        archive.read(forged)


# --- fuzzing: only SafeckptError may escape ------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_torch_zip_raises_only_safeckpt_errors(small_torch, data):
    blob = bytearray(small_torch)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    try:
        archive = ZipArchive(bytes(blob), "fuzz.pt")
        for name in archive.names():
            try:
                bytes(archive.read(name))
            except SafeckptError:
                pass
        archive.check_crcs()
        assert all(f.kind in FINDING_KINDS for f in archive.findings)
    except SafeckptError as exc:
        assert "fuzz.pt" in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_central_directory_fields(data):
    """Flips targeted at the directory and end record, where every field is a length or an offset."""
    blob = bytearray(zipfile_bytes({"a.npy": b"x" * 200, "b": b"y" * 30}, compression=zipfile.ZIP_DEFLATED))
    directory = blob.index(b"PK\x01\x02")
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(directory, len(blob) - 1))
        blob[at] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, data.draw(st.integers(0, 255))]))
    try:
        archive = ZipArchive(bytes(blob), "fuzz.zip")
        for name in archive.names():
            try:
                bytes(archive.read(name))
            except SafeckptError:
                pass
        archive.check_crcs()
    except SafeckptError:
        pass
