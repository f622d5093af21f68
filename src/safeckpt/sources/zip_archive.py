"""Zip archives read as data: members located zero-copy, tricks reported as findings.

The format (PKWARE APPNOTE.TXT 6.3; all integers little-endian, unsigned)
-------------------------------------------------------------------------
A zip archive is a run of members followed by a central directory and an end
record::

    [local file header 1][data 1][data descriptor 1] ... [local file header n][data n] ...
    [central directory header 1] ... [central directory header n]
    [zip64 end of central directory record]      (only when a field below overflows)
    [zip64 end of central directory locator]     (idem)
    [end of central directory record][archive comment]

End of central directory record (EOCD), 22 bytes + comment, found by searching
backwards from the end of the file (the comment makes its position variable)::

    signature 0x06054b50 "PK\\5\\6" | disk number (2) | disk of the central directory (2)
    entries on this disk (2) | total entries (2) | central directory size (4)
    central directory offset (4) | comment length (2) | comment

ZIP64 locator, 20 bytes, immediately before the EOCD::

    signature 0x07064b50 "PK\\6\\7" | disk of the zip64 end record (4)
    offset of the zip64 end record (8) | total disks (4)

ZIP64 end of central directory record, 56 bytes + extensible data; the EOCD
fields that hold 0xFFFF / 0xFFFFFFFF take their values from here::

    signature 0x06064b50 "PK\\6\\6" | size of the rest of this record (8)
    version made by (2) | version needed (2) | disk number (4) | disk of the central directory (4)
    entries on this disk (8) | total entries (8) | central directory size (8) | central directory offset (8)

Central directory file header, 46 bytes + name + extra + comment, one per member;
this is the authoritative list of members (and the only place the local
header's offset is recorded)::

    signature 0x02014b50 "PK\\1\\2" | version made by (2) | version needed (2) | flags (2)
    method (2) | time (2) | date (2) | crc-32 (4) | compressed size (4) | uncompressed size (4)
    name length (2) | extra length (2) | comment length (2) | disk number start (2)
    internal attributes (2) | external attributes (4) | local header offset (4)

Local file header, 30 bytes + name + extra, directly before the member's bytes.
Its own name and extra lengths decide where the data starts (torch pads the
extra field so that every data record starts on a 64-byte boundary)::

    signature 0x04034b50 "PK\\3\\4" | version needed (2) | flags (2) | method (2) | time (2)
    date (2) | crc-32 (4) | compressed size (4) | uncompressed size (4)
    name length (2) | extra length (2)

Data descriptor, after the data when flag bit 3 is set (then the local header's
crc and sizes are zero and the central directory holds the real ones)::

    [signature 0x08074b50] | crc-32 (4) | compressed size (4, or 8 in zip64) | uncompressed size (idem)

Extra fields are (id (2), size (2), data) records. ZIP64 extended information
(id 0x0001) holds, in this order and only for the header fields that hold
0xFFFFFFFF (0xFFFF for the disk): uncompressed size (8), compressed size (8),
local header offset (8), disk number (4).

Flags: bit 0 encrypted, bit 3 data descriptor, bit 6 strong encryption, bit 11
name is UTF-8 (else IBM code page 437), bit 13 central directory encrypted.
Methods: 0 stored, 8 deflated (raw deflate, RFC 1951); we read no others.

Offsets are relative to the start of the archive. When bytes were prepended to
an archive (a self-extractor, or a pickle in front of a torch zip: a polyglot)
they are off by the prefix length unless the writer adjusted them; as
Python's zipfile does, the prefix length is recovered as ``EOCD position -
central directory size - central directory offset``.

What this module does
---------------------
`ZipArchive` reads the end records with ``struct``, copies the central
directory (metadata only), and reads all its entries and then all the local
headers (30 bytes and the name each: they decide where the data starts) as
numpy record arrays gathered at the entries' offsets, so that opening costs a
few vector operations and the member names, whatever the number of members.
Member data is never copied: a stored member is read as a zero-copy slice of
the buffer, a deflated one is inflated with an output bound. Every offset,
length and count is checked against the bytes actually present before it is
used; structure that makes the archive unreadable is a `SourceError` naming
the file and the offset. Structure that is readable but suspicious (what zip
tricks are made of) becomes a `ZipFinding` in ``archive.findings``; see
`FINDING_KINDS`. CRCs are checked only on request (`check_crcs`), because
opening a multi-GB torch file must cost only its central directory.

Example::

    >>> archive = ZipArchive(open("model.pt", "rb").read(), "model.pt")
    >>> archive.names()[0]
    'archive/data.pkl'
    >>> bytes(archive.read("archive/byteorder"))
    b'little'
"""

from __future__ import annotations

import functools
import mmap
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from safeckpt.errors import SafeckptError, SourceError

__all__ = [
    "ZIP_MAGIC", "FINDING_KINDS", "ZipMember", "ZipFinding", "ZipArchive", "is_zip", "find_zip",
    "MAX_MEMBERS", "MAX_NAME_LENGTH", "MAX_COMMENT_LENGTH", "MAX_DIRECTORY_SIZE", "MAX_TAIL_SEARCH",
    "MAX_DECOMPRESSED_SIZE", "MAX_FINDINGS_PER_KIND",
]

ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ARCHIVE_MAGIC = b"PK\x05\x06"

# --- limits -------------------------------------------------------------------
# Each bounds work or memory that a hostile file could otherwise make unbounded.
# They are read when an archive is opened: set them on this module to lift them.

# Members in one archive: a torch checkpoint has one per storage (tens of
# thousands for the largest models); a million entries already cost ~1 GB of
# Python objects once listed, so more is refused before any is parsed.
MAX_MEMBERS = 1_000_000
# A member name longer than any file system's path limit (4096 on Linux) has no
# legitimate use, and every name is kept in memory and shown in messages.
MAX_NAME_LENGTH = 4096
# The archive comment: the format's own ceiling (a 2-byte length); it also
# bounds how far from the end of the file the end record can be.
MAX_COMMENT_LENGTH = 0xFFFF
# The central directory is copied to be parsed: a million members with long
# names fit in ~200 MB, so a larger one is refused rather than copied.
MAX_DIRECTORY_SIZE = 512 << 20
# How far back from the end of the file the end record is searched for. The
# record and its comment span at most 22 + 65535 bytes; we look further so that
# junk appended after an archive is reported as trailing data rather than
# making the archive unreadable, and no further so that recognising a non-zip
# reads at most this much.
MAX_TAIL_SEARCH = 1 << 20
# Default bound on the output of inflating one member: the declared size is
# only a claim, and this is the most memory one read may take unless the
# caller passes a larger max_size (stored members are views and cost nothing).
MAX_DECOMPRESSED_SIZE = 4 << 30
# Findings of one kind listed individually; past this one summary finding says
# how many more there were (an archive of a million overlapping entries must
# not produce a million findings).
MAX_FINDINGS_PER_KIND = 100

# Deflate cannot expand more than 1032:1 (a 258-byte match costs at least 2
# bits); a declared size beyond that ratio is a lie, refused before inflating.
_DEFLATE_MAX_RATIO = 1032
_DEFLATE_RATIO_SLACK = 1024
# Pieces in which a CRC check inflates a member: the most memory it takes.
_INFLATE_INPUT_CHUNK = 1 << 20
_INFLATE_OUTPUT_CHUNK = 16 << 20
# The central directory is scanned for entry signatures in bulk (a few times its
# size in temporary arrays) up to this size; a larger one is walked entry by entry.
_BULK_SCAN_LIMIT = 64 << 20
# Name bytes compared per block between local and central headers (bounds the index arrays).
_COMPARE_BLOCK = 1 << 20
# Compressed bytes inflated to look for a nested archive's signature.
_SNIFF_COMPRESSED = 4096
# Bytes of content needed to recognise a nested archive (a tar's "ustar" ends at 262).
_SNIFF_BYTES = 262
# A declared size at or past 2**63 bytes (8 EiB) cannot be real and would overflow int64 arithmetic.
_MAX_DECLARED = (1 << 63) - 1

# --- records ------------------------------------------------------------------

_EOCD = struct.Struct("<I4H2IH")
_LOCATOR = struct.Struct("<IIQI")
_EOCD64 = struct.Struct("<IQ2H2I4Q")
_ENTRY_LENGTHS = struct.Struct("<28x3H")  # name, extra and comment lengths of a central entry
_EXTRA_HEADER = struct.Struct("<2H")

# The central directory and local headers are read in bulk, as numpy records.
_CENTRAL_RECORD = np.dtype([
    ("signature", "<u4"), ("version_made_by", "<u2"), ("version_needed", "<u2"), ("flags", "<u2"),
    ("method", "<u2"), ("time", "<u2"), ("date", "<u2"), ("crc32", "<u4"), ("compressed_size", "<u4"),
    ("size", "<u4"), ("name_length", "<u2"), ("extra_length", "<u2"), ("comment_length", "<u2"),
    ("disk", "<u2"), ("internal_attributes", "<u2"), ("external_attributes", "<u4"),
    ("header_offset", "<u4"),
])
_LOCAL_RECORD = np.dtype([
    ("signature", "<u4"), ("version_needed", "<u2"), ("flags", "<u2"), ("method", "<u2"), ("time", "<u2"),
    ("date", "<u2"), ("crc32", "<u4"), ("compressed_size", "<u4"), ("size", "<u4"),
    ("name_length", "<u2"), ("extra_length", "<u2"),
])
assert _CENTRAL_RECORD.itemsize == 46 and _LOCAL_RECORD.itemsize == 30

_EOCD_SIG = 0x06054B50
_LOCATOR_SIG = 0x07064B50
_EOCD64_SIG = 0x06064B50
_CENTRAL_SIG = 0x02014B50
_LOCAL_SIG = 0x04034B50
_ZIP64_EXTRA_ID = 0x0001

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF

_FLAG_ENCRYPTED = 0x0001
_FLAG_DESCRIPTOR = 0x0008
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_FLAG_MASKED_HEADERS = 0x2000
_ENCRYPTION_FLAGS = _FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION | _FLAG_MASKED_HEADERS
# Flags whose disagreement between the two headers changes how a member is read.
_MEANINGFUL_FLAGS = _ENCRYPTION_FLAGS | _FLAG_UTF8

STORED, DEFLATED = 0, 8
_METHOD_NAMES = {0: "stored", 1: "shrunk", 6: "imploded", 8: "deflated", 9: "deflate64", 12: "bzip2",
                 14: "LZMA", 93: "zstd", 95: "xz", 98: "PPMd", 99: "AES-encrypted"}

# What a nested archive starts with: (offset, magic, what it is).
_NESTED_SIGNATURES = (
    (0, b"PK\x03\x04", "a zip archive"),
    (0, b"PK\x05\x06", "an empty zip archive"),
    (0, b"\x1f\x8b\x08", "a gzip stream"),
    (0, b"BZh", "a bzip2 stream"),
    (0, b"\xfd7zXZ\x00", "an xz stream"),
    (0, b"\x28\xb5\x2f\xfd", "a zstd stream"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (257, b"ustar", "a tar archive"),
)
# Substrings of the joined names that send a name to the unsafe-name check.
_NAME_SCREEN = ("\\", "\x00", "..", ":", "\n/")

FINDING_KINDS = {
    "duplicate-name": "two central-directory entries share a name; readers disagree on which one counts",
    "name-mismatch": "the local header names the member differently from the central directory",
    "header-mismatch": "the local header disagrees with the central directory on method, flags or CRC",
    "encrypted": "the member is encrypted (flag bit 0, 6 or 13) and cannot be read or checked",
    "unsupported-method": "the member is compressed with a method other than stored or deflated",
    "prepended-data": "bytes before the first local header: another file hides in front (a polyglot)",
    "trailing-data": "bytes after the end record and its comment",
    "hidden-data": "bytes inside or right after the central directory that belong to no entry",
    "overlapping-members": "two members' byte ranges overlap (zip bombs and polyglots are made this way)",
    "size-mismatch": "a stored member whose sizes differ, or local and central sizes that disagree",
    "nested-archive": "a member whose content is itself an archive or compressed stream",
    "unsafe-name": "a name that is absolute, climbs with '..', holds a backslash or NUL, or is bad UTF-8",
    "bad-crc": "the member's bytes do not match its recorded CRC-32 (from check_crcs)",
    "unreadable": "the member's compressed data is corrupt or lies about its size (from check_crcs)",
}


@dataclass(frozen=True)
class ZipMember:
    """One member as the central directory declares it, located in the file."""

    name: str               # as in the central directory (UTF-8 if flag bit 11, else cp437)
    header_offset: int      # absolute offset of its local header in the buffer
    data_offset: int        # absolute offset of its (compressed) bytes in the buffer
    compressed_size: int
    size: int
    method: int             # 0 stored, 8 deflated (others: readable only as a finding)
    crc32: int
    flags: int


@dataclass(frozen=True)
class ZipFinding:
    """Something readable but suspicious about an archive; `kind` is a key of `FINDING_KINDS`."""

    kind: str
    member: Optional[str]
    detail: str             # one readable sentence
    offset: int             # absolute offset it concerns (-1 if none)


Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]


def is_zip(head: bytes) -> bool:
    """Whether `head` (the first bytes of a file) starts a zip archive.

    Archives with bytes in front are not recognised here; `find_zip` finds them.

    >>> is_zip(b"PK\\x03\\x04\\x14\\x00")
    True
    """
    return bytes(head[:4]) in (ZIP_MAGIC, _EMPTY_ARCHIVE_MAGIC)


def find_zip(data: Buffer) -> Optional[int]:
    """Offset of the first local header if `data` ends with a readable zip archive, else None.

    0 for a plain archive; more when something (a pickle, an executable) was
    put in front of it: ``data[:find_zip(data)]`` is what hides there.

    >>> front = pickle.dumps({"x": 1})
    >>> find_zip(front + open("model.pt", "rb").read()) == len(front)
    True
    """
    try:
        return ZipArchive(data, "<buffer>").start
    except SafeckptError:
        return None


class ZipArchive:
    """A zip archive over a buffer holding the whole file; nothing is copied or trusted.

    >>> archive = ZipArchive(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), "model.pt")
    >>> archive.member("archive/data/0").data_offset % 64
    0
    >>> [f.kind for f in archive.findings]
    []
    """

    path: str
    start: int              # offset of the first local header (> 0: bytes were put in front)
    comment: bytes          # the archive comment
    directory: tuple[int, int, int]  # where the central directory lies: (offset, size, entries)
    findings: list[ZipFinding]

    def __init__(self, data: Buffer, path: str) -> None:
        self.path = path
        self._data = data
        self.findings = []
        self.comment = b""
        self._names: list[str] = []
        self._columns: tuple[list[int], ...] = ([],) * 7   # header, data, csize, size, method, crc, flags
        self._arrays: tuple[np.ndarray, ...] = (np.zeros(0, dtype=np.int64),) * 7  # the same, as arrays
        self._first: dict[str, int] = {}
        self._members: Optional[list[ZipMember]] = None
        self._counts: dict[str, int] = {}
        self._checked: set[ZipMember] = set()
        # No slice of the view or numpy array over it outlives a call, so that the
        # caller can close an mmap as soon as it is done (even after an error).
        with _byte_view(data, path) as view:
            self._size = len(view)
            self._parse(view)
        self._summarize_findings(self.findings)

    # -- the public reading API
    @property
    def members(self) -> list[ZipMember]:
        """All members in central-directory order (duplicates included); built on first use."""
        if self._members is None:
            self._members = list(map(ZipMember, self._names, *self._columns))
        return self._members

    def names(self) -> list[str]:
        """Member names in central-directory order (duplicates included)."""
        return list(self._names)

    def member(self, name: str) -> ZipMember:
        """The first central-directory entry named `name`."""
        index = self._first.get(name)
        if index is None:
            raise SourceError(f"no member {name!r} in the zip archive ({len(self._names)} members)",
                              path=self.path)
        return self._record(index)

    def _record(self, index: int) -> ZipMember:
        if self._members is not None:
            return self._members[index]
        return ZipMember(self._names[index], *(column[index] for column in self._columns))

    def read(self, member: "str | ZipMember", *, max_size: Optional[int] = None) -> memoryview:
        """The uncompressed bytes of a member.

        Stored: a zero-copy slice of the buffer. Deflated: inflated with the
        output bounded by the declared size and by `max_size` (default
        `MAX_DECOMPRESSED_SIZE`); a size lie or a bomb is a `SourceError`. An
        explicit `max_size` bounds stored members too.

        >>> bytes(archive.read("archive/version", max_size=16))
        b'3\\n'
        """
        record = self.member(member) if isinstance(member, str) else member
        where = f"member {record.name!r}"
        if record.flags & _ENCRYPTION_FLAGS:
            raise SourceError(f"{where} is encrypted (flags {record.flags:#06x}); it cannot be read",
                              path=self.path)
        end = record.data_offset + record.compressed_size
        if record.data_offset < 0 or record.compressed_size < 0 or end > self._size:
            raise SourceError(f"{where}: its data (offset {record.data_offset}, {record.compressed_size} "
                              f"bytes) lies outside the file ({self._size} bytes)", path=self.path)
        limit = MAX_DECOMPRESSED_SIZE if max_size is None else max_size
        if record.size > limit and (record.method != STORED or max_size is not None):
            raise SourceError(f"{where} declares {record.size} bytes, more than the limit of {limit}; "
                              "pass a larger max_size if the archive is trusted", path=self.path)
        if record.method == STORED:
            if record.compressed_size != record.size:
                raise SourceError(f"{where} is stored but declares {record.size} bytes and holds "
                                  f"{record.compressed_size}: its length is ambiguous", path=self.path)
            with _byte_view(self._data, self.path) as whole:
                return whole[record.data_offset:end]
        if record.method == DEFLATED:
            return memoryview(self._inflate(record, where))
        raise SourceError(f"{where} is compressed with method {record.method} "
                          f"({_METHOD_NAMES.get(record.method, 'unknown')}); only stored and deflated "
                          "members can be read", path=self.path)

    def crc_ok(self, member: "str | ZipMember") -> bool:
        """Whether the member's uncompressed bytes match its recorded CRC-32.

        Deflated members are inflated piece by piece: memory stays bounded
        whatever the size.

        >>> archive.crc_ok("archive/data.pkl")
        True
        """
        record = self.member(member) if isinstance(member, str) else member
        if record.method != DEFLATED or record.flags & _ENCRYPTION_FLAGS:
            with self.read(record) as content:
                return zlib.crc32(content) == record.crc32
        crc = 0
        for piece in self._inflate_pieces(record, f"member {record.name!r}"):
            crc = zlib.crc32(piece, crc)
        return crc == record.crc32

    def check_crcs(self, members: "Optional[Iterable[str | ZipMember]]" = None) -> list[ZipFinding]:
        """Check the CRC-32 of `members` (default: all); add the findings and return them.

        Encrypted and unsupported members are skipped (they have a finding
        already); a member that cannot be inflated is an "unreadable" finding.

        >>> [f.member for f in archive.check_crcs()]
        []
        """
        records = self.members if members is None else [
            self.member(m) if isinstance(m, str) else m for m in members]
        new: list[ZipFinding] = []
        for record in records:
            if record in self._checked or record.flags & _ENCRYPTION_FLAGS \
                    or record.method not in (STORED, DEFLATED):
                continue
            self._checked.add(record)
            try:
                ok = self.crc_ok(record)
            except SourceError as exc:
                self._note(new, "unreadable", record.name, exc.detail, record.data_offset)
                continue
            if not ok:
                self._note(new, "bad-crc", record.name,
                           f"member {record.name!r}: its bytes do not match the recorded CRC-32 "
                           f"{record.crc32:#010x}", record.data_offset)
        self._summarize_findings(new)
        self.findings.extend(new)
        return new

    # -- parsing: the end records
    def _parse(self, view: memoryview) -> None:
        end_of_record, count, cd_size, cd_offset, cd_limit = self._read_end_records(view)
        cd_start = self._locate_central_directory(view, count, cd_size, cd_offset, cd_limit)
        self.directory = (cd_start, cd_size, count)
        directory = bytes(view[cd_start:cd_start + cd_size])
        offsets = self._entry_offsets(directory, count, cd_start)
        self._read_members(view, directory, offsets, base=cd_start - cd_offset, cd_start=cd_start)
        self.start = min(self._columns[0], default=cd_start)
        if self.start > 0:
            self._note(self.findings, "prepended-data", None,
                       f"{self.start} bytes before the first local header (they start with "
                       f"{bytes(view[:16])!r}): another file hides in front of the archive", 0)
        if end_of_record < self._size:
            self._note(self.findings, "trailing-data", None,
                       f"{self._size - end_of_record} bytes after the end of the archive (they start "
                       f"with {bytes(view[end_of_record:end_of_record + 16])!r})", end_of_record)
        self._check_nested(view)
        self._check_overlaps(cd_start, end_of_record)

    def _error(self, detail: str, offset: int) -> SourceError:
        return SourceError(f"zip archive: {detail} (at offset {offset})", path=self.path)

    def _read_end_records(self, view: memoryview) -> tuple[int, int, int, int, int]:
        """(end of the archive, entries, CD size, CD offset, where the CD must end at the latest)."""
        eocd = self._find_eocd(view)
        _, disk, cd_disk, on_disk, count, cd_size, cd_offset, comment_length = _EOCD.unpack_from(view, eocd)
        end_of_record = eocd + _EOCD.size + comment_length
        self.comment = bytes(view[eocd + _EOCD.size:end_of_record])
        cd_limit = eocd
        locator = eocd - _LOCATOR.size
        if _u32(view, locator) == _LOCATOR_SIG:
            _, _, record_offset, _ = _LOCATOR.unpack_from(view, locator)
            record = self._find_zip64_record(view, locator, record_offset)
            (_, _, _, _, disk64, cd_disk64, on_disk64, count64, cd_size64,
             cd_offset64) = _EOCD64.unpack_from(view, record)
            for label, narrow, wide, full in (("entry count", count, count64, _U16_MAX),
                                              ("entries on this disk", on_disk, on_disk64, _U16_MAX),
                                              ("central directory size", cd_size, cd_size64, _U32_MAX),
                                              ("central directory offset", cd_offset, cd_offset64, _U32_MAX)):
                if narrow not in (full, wide):
                    raise self._error(f"the ZIP64 end record's {label} ({wide}) contradicts the end "
                                      f"record's ({narrow})", record)
            disk, cd_disk, on_disk, count, cd_size, cd_offset = (
                disk64, cd_disk64, on_disk64, count64, cd_size64, cd_offset64)
            cd_limit = record
        if disk != 0 or cd_disk != 0 or on_disk != count:
            raise self._error(f"a multi-disk (spanned) archive: disk {disk}, central directory on disk "
                              f"{cd_disk}, {on_disk} of {count} entries here; only single-file archives "
                              "are read", eocd)
        if count > MAX_MEMBERS:
            raise self._error(f"the end record declares {count} members, more than the limit of "
                              f"{MAX_MEMBERS}", eocd)
        if count * _CENTRAL_RECORD.itemsize > cd_size:
            raise self._error(f"the end record declares {count} members but a central directory of "
                              f"{cd_size} bytes holds at most {cd_size // _CENTRAL_RECORD.itemsize}", eocd)
        if cd_size > cd_limit:
            raise self._error(f"the central directory size ({cd_size} bytes) exceeds the "
                              f"{cd_limit} bytes before the end record", eocd)
        if cd_size > MAX_DIRECTORY_SIZE:
            raise self._error(f"the central directory is {cd_size} bytes, more than the limit of "
                              f"{MAX_DIRECTORY_SIZE}", eocd)
        return end_of_record, count, cd_size, cd_offset, cd_limit

    def _find_eocd(self, view: memoryview) -> int:
        """The end record: the last one whose comment ends the file, else the last one that fits."""
        low = max(0, self._size - MAX_TAIL_SEARCH)
        tail = bytes(view[low:])
        signature = _EOCD_SIG.to_bytes(4, "little")
        fallback = None
        end = len(tail)
        while True:
            at = tail.rfind(signature, 0, end)
            if at < 0:
                break
            end = at + len(signature) - 1
            if at + _EOCD.size > len(tail):
                continue
            record_end = at + _EOCD.size + int.from_bytes(tail[at + 20:at + 22], "little")
            if record_end == len(tail):
                return low + at
            if record_end < len(tail) and fallback is None:
                fallback = low + at
            if fallback is not None and len(tail) - at > _EOCD.size + MAX_COMMENT_LENGTH:
                break  # no record this far back can end exactly at the end of the file
        if fallback is None:
            raise self._error(f"no end of central directory record in the last {len(tail)} bytes: "
                              "not a zip archive, or a truncated one", self._size)
        return fallback

    def _find_zip64_record(self, view: memoryview, locator: int, record_offset: int) -> int:
        """Where the ZIP64 end record is: at its declared offset, or right before the locator."""
        for at in (record_offset, locator - _EOCD64.size):
            if 0 <= at <= locator - _EOCD64.size and _u32(view, at) == _EOCD64_SIG:
                rest = _EOCD64.unpack_from(view, at)[1]
                if _EOCD64.size - 12 <= rest <= locator - at - 12:
                    return at
        raise self._error(f"the ZIP64 locator points to offset {record_offset}, where there is no "
                          "ZIP64 end of central directory record", locator)

    def _locate_central_directory(self, view: memoryview, count: int, cd_size: int, cd_offset: int,
                                  cd_limit: int) -> int:
        """Absolute start of the central directory, allowing for bytes put in front of the archive."""
        def starts_directory(at: int) -> bool:
            return count == 0 or _u32(view, at) == _CENTRAL_SIG

        prefix = cd_limit - cd_size - cd_offset
        if prefix >= 0 and starts_directory(cd_offset + prefix):
            return cd_offset + prefix
        if cd_offset + cd_size <= cd_limit and starts_directory(cd_offset):
            self._note(self.findings, "hidden-data", None,
                       f"{cd_limit - cd_offset - cd_size} bytes between the central directory and the "
                       "end record belong to no member", cd_offset + cd_size)
            return cd_offset
        raise self._error(f"the central directory (offset {cd_offset}, {cd_size} bytes) is not where "
                          f"the end record says: it would end past offset {cd_limit} or does not start "
                          "with a central directory header", cd_limit)

    # -- parsing: the central directory and the local headers
    def _entry_offsets(self, directory: bytes, count: int, cd_start: int) -> np.ndarray:
        """Offsets in `directory` of its `count` entries, each right after the previous one."""
        # Fast path: the signatures found are exactly the entries and chain up.
        found = _signatures(directory, _CENTRAL_SIG, _CENTRAL_RECORD.itemsize) \
            if _CENTRAL_RECORD.itemsize <= len(directory) <= _BULK_SCAN_LIMIT else np.zeros(0, dtype=np.intp)
        if len(found) == count and count:
            rows = _records(directory, found, _CENTRAL_RECORD)
            after = (found + _CENTRAL_RECORD.itemsize + rows["name_length"].astype(np.int64)
                     + rows["extra_length"] + rows["comment_length"])
            if found[0] == 0 and (after[:-1] == found[1:]).all() and after[-1] <= len(directory):
                self._note_directory_slack(directory, int(after[-1]), cd_start)
                return found
        offsets = []
        at = 0
        for index in range(count):
            if at + _CENTRAL_RECORD.itemsize > len(directory):
                raise self._error(f"central directory entry {index} of {count} runs past the end of the "
                                  f"central directory ({cd_start + len(directory)})", cd_start + at)
            if int.from_bytes(directory[at:at + 4], "little") != _CENTRAL_SIG:
                raise self._error(f"central directory entry {index} has signature "
                                  f"{int.from_bytes(directory[at:at + 4], 'little'):#010x}, not "
                                  f"{_CENTRAL_SIG:#010x}", cd_start + at)
            name_length, extra_length, comment_length = _ENTRY_LENGTHS.unpack_from(directory, at)
            offsets.append(at)
            at += _CENTRAL_RECORD.itemsize + name_length + extra_length + comment_length
            if at > len(directory):
                raise self._error(f"central directory entry {index} of {count} (with its name, extra "
                                  f"field and comment) runs past the end of the central directory "
                                  f"({cd_start + len(directory)})", cd_start + offsets[-1])
        self._note_directory_slack(directory, at, cd_start)
        return np.array(offsets, dtype=np.int64)

    def _note_directory_slack(self, directory: bytes, used: int, cd_start: int) -> None:
        if used < len(directory):
            what = ("hold more entries than the end record counts (readers that walk the directory see "
                    "members that others do not)" if int.from_bytes(directory[used:used + 4], "little")
                    == _CENTRAL_SIG else "belong to no entry")
            self._note(self.findings, "hidden-data", None,
                       f"the last {len(directory) - used} bytes of the central directory {what}",
                       cd_start + used)

    def _read_members(self, view: memoryview, directory: bytes, offsets: np.ndarray, base: int,
                      cd_start: int) -> None:
        """Every entry and its local header, bounds-checked; entries that look odd go to `_inspect`."""
        count = len(offsets)
        if not count:
            return
        rows = _records(directory, offsets, _CENTRAL_RECORD)
        flags, method, crc, csize, usize, name_length, header = (rows[field].astype(np.int64) for field in (
            "flags", "method", "crc32", "compressed_size", "size", "name_length", "header_offset"))
        entry_at = cd_start + offsets
        self._refuse(name_length > MAX_NAME_LENGTH, lambda i: (
            f"central directory entry {i} has a name of {name_length[i]} bytes, more than the limit "
            f"of {MAX_NAME_LENGTH}", int(entry_at[i])))
        name_start = offsets + _CENTRAL_RECORD.itemsize
        raw_names = list(map(directory.__getitem__, map(slice, name_start.tolist(),
                                                        (name_start + name_length).tolist())))
        names = self._decode_names(raw_names, flags & _FLAG_UTF8 != 0, entry_at)

        wide = np.flatnonzero((csize == _U32_MAX) | (usize == _U32_MAX) | (header == _U32_MAX)
                              | (rows["disk"] == _U16_MAX))
        for i in wide.tolist():
            extra_start = int(name_start[i] + name_length[i])
            usize[i], csize[i], header[i] = self._apply_zip64(
                directory[extra_start:extra_start + int(rows["extra_length"][i])],
                (int(usize[i]), int(csize[i]), int(header[i]), int(rows["disk"][i])), names[i],
                int(entry_at[i]))
        other_disk = rows["disk"] != 0
        other_disk[wide] = False  # their disk came from the ZIP64 field and was checked there
        self._refuse(other_disk, lambda i: (
            f"member {names[i]!r} starts on disk {rows['disk'][i]}: a multi-disk archive", int(entry_at[i])))
        self._refuse((header > self._size) | (csize > self._size), lambda i: (
            f"member {names[i]!r} declares {csize[i]} bytes at offset {header[i]}, past the end of the "
            f"file ({self._size} bytes)", int(entry_at[i])))

        header += base
        self._refuse(header + _LOCAL_RECORD.itemsize > self._size, lambda i: (
            f"member {names[i]!r}: its local header lies outside the file ({self._size} bytes)",
            int(header[i])))
        local = _records(view, header, _LOCAL_RECORD)
        self._refuse(local["signature"] != _LOCAL_SIG, lambda i: (
            f"member {names[i]!r}: no local header where the central directory says (signature "
            f"{int(local['signature'][i]):#010x})", int(header[i])))
        data = (header + _LOCAL_RECORD.itemsize + local["name_length"].astype(np.int64)
                + local["extra_length"])
        self._refuse(data + csize > self._size, lambda i: (
            f"member {names[i]!r}: its data ({csize[i]} bytes at offset {data[i]}) runs past the end of "
            f"the file ({self._size} bytes)", int(data[i])))

        self._names = names
        self._arrays = (header, data, csize, usize, method, crc, flags)
        self._columns = tuple(column.tolist() for column in self._arrays)
        self._first = dict(zip(reversed(names), range(count - 1, -1, -1)))
        if len(self._first) < count:
            self._note_duplicates()
        for i in self._odd_entries(view, rows, local, raw_names):
            self._inspect(view, i, raw_names[i], local[i])

    def _decode_names(self, raw_names: list[bytes], utf8: np.ndarray, entry_at: np.ndarray) -> list[str]:
        if utf8.all() or b"".join(raw_names).isascii():  # then every name decodes as UTF-8
            try:
                return list(map(bytes.decode, raw_names))
            except UnicodeDecodeError:
                pass
        return [self._decode_name(raw, u, at)
                for raw, u, at in zip(raw_names, utf8.tolist(), entry_at.tolist())]

    def _odd_entries(self, view: memoryview, rows: np.ndarray, local: np.ndarray,
                     raw_names: list[bytes]) -> list[int]:
        """Entries that earn a closer look; the others (every entry of a normal archive) are done."""
        header, _, csize, usize, method, crc, flags = self._arrays
        odd = ((local["name_length"] != rows["name_length"]) | (local["method"] != method)
               | (local["flags"] != flags) | (flags & _ENCRYPTION_FLAGS != 0)
               | ((method != STORED) & (method != DEFLATED)) | ((method == STORED) & (csize != usize))
               | ((flags & _FLAG_DESCRIPTOR == 0) & ((local["crc32"] != crc)
                                                    | (local["compressed_size"] != csize)
                                                    | (local["size"] != usize))))
        same = np.flatnonzero(~odd)
        lengths = rows["name_length"].astype(np.int64)
        name_starts = np.cumsum(lengths) - lengths
        central_names = np.frombuffer(b"".join(raw_names), dtype=np.uint8)
        odd[same] = _differ(view, header[same] + _LOCAL_RECORD.itemsize, central_names, name_starts[same],
                            lengths[same])
        odd = odd.tolist()
        if any(mark in "\n" + "\n".join(self._names) for mark in _NAME_SCREEN):
            for i, name in enumerate(self._names):
                odd[i] = odd[i] or bool(_unsafe_name_reasons(name))
        return [i for i, flagged in enumerate(odd) if flagged]

    def _refuse(self, bad: np.ndarray, explain) -> None:
        """Raise for the first entry where `bad` holds; `explain(i)` gives (detail, offset)."""
        where = np.flatnonzero(bad)
        if len(where):
            detail, offset = explain(int(where[0]))
            more = f" ({len(where) - 1} more entries are as bad)" if len(where) > 1 else ""
            raise self._error(detail + more, offset)

    def _decode_name(self, raw: bytes, utf8: bool, offset: int) -> str:
        if not utf8:
            return raw.decode("cp437")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            name = raw.decode("utf-8", "replace")
            self._note(self.findings, "unsafe-name", name,
                       f"member name {raw[:64]!r} is flagged UTF-8 but is not valid UTF-8", offset)
            return name

    def _apply_zip64(self, extra: bytes, fields: tuple[int, int, int, int], name: str,
                     offset: int) -> tuple[int, int, int]:
        """(size, compressed size, header offset), maxed-out fields read from the ZIP64 extra field."""
        payload = _extra_field(extra, _ZIP64_EXTRA_ID)
        if payload is None:
            raise self._error(f"member {name!r} has ZIP64 placeholder values (0xFFFFFFFF) but no "
                              "well-formed ZIP64 extra field", offset)
        values = list(fields)
        at = 0
        for i, (full, width) in enumerate(((_U32_MAX, 8), (_U32_MAX, 8), (_U32_MAX, 8), (_U16_MAX, 4))):
            if values[i] != full:
                continue
            if at + width > len(payload):
                raise self._error(f"member {name!r}: its ZIP64 extra field ({len(payload)} bytes) is too "
                                  "short for the fields it must hold", offset)
            values[i] = int.from_bytes(payload[at:at + width], "little")
            at += width
        if max(values[:3]) > _MAX_DECLARED:
            raise self._error(f"member {name!r}: its ZIP64 extra field declares a size or offset past "
                              "2**63 bytes", offset)
        if values[3] != 0:
            raise self._error(f"member {name!r} starts on disk {values[3]}: a multi-disk archive", offset)
        return values[0], values[1], values[2]

    # -- findings on single entries
    def _note_duplicates(self) -> None:
        seen: set[str] = set()
        for index, name in enumerate(self._names):
            if name in seen:
                first = self._first[name]
                self._note(self.findings, "duplicate-name", name,
                           f"member {name!r} appears again as entry {index} (first as entry {first}); "
                           "readers disagree on which one they use", self._columns[0][index])
            seen.add(name)

    def _inspect(self, view: memoryview, index: int, raw_name: bytes, local: np.void) -> None:
        """The slow path: which findings one entry deserves."""
        record = self._record(index)
        name, flags, method, header = record.name, record.flags, record.method, record.header_offset
        local_flags, local_method = int(local["flags"]), int(local["method"])
        note = functools.partial(self._note, self.findings)
        name_at = header + _LOCAL_RECORD.itemsize
        local_raw = bytes(view[name_at:name_at + int(local["name_length"])])
        if local_raw != raw_name:
            local_name = local_raw.decode("utf-8" if local_flags & _FLAG_UTF8 else "cp437", "replace")
            note("name-mismatch", name, f"member {name!r} is named {local_name!r} in its local header",
                 header)
        descriptor = (flags | local_flags) & _FLAG_DESCRIPTOR
        if local_method != method or (local_flags ^ flags) & _MEANINGFUL_FLAGS or (
                not descriptor and int(local["crc32"]) != record.crc32):
            note("header-mismatch", name,
                 f"member {name!r}: the local header says method {local_method}, flags {local_flags:#06x}, "
                 f"crc {int(local['crc32']):#010x}; the central directory says method {method}, flags "
                 f"{flags:#06x}, crc {record.crc32:#010x}", header)
        if not descriptor:
            extra_at = name_at + len(local_raw)
            self._compare_local_sizes(bytes(view[extra_at:extra_at + int(local["extra_length"])]), record,
                                      int(local["compressed_size"]), int(local["size"]))
        if flags & _ENCRYPTION_FLAGS:
            note("encrypted", name, f"member {name!r} is encrypted (flags {flags:#06x})", header)
        elif method == STORED and record.compressed_size != record.size:
            note("size-mismatch", name, f"member {name!r} is stored but declares {record.size} bytes and "
                 f"holds {record.compressed_size}", record.data_offset)
        if method not in (STORED, DEFLATED):
            note("unsupported-method", name, f"member {name!r} uses compression method {method} "
                 f"({_METHOD_NAMES.get(method, 'unknown')})", header)
        reasons = _unsafe_name_reasons(name)
        if reasons:
            note("unsafe-name", name, f"member name {name!r} {' and '.join(reasons)}", header)

    def _compare_local_sizes(self, extra: bytes, record: ZipMember, csize: int, usize: int) -> None:
        if csize == _U32_MAX or usize == _U32_MAX:
            payload = _extra_field(extra, _ZIP64_EXTRA_ID) or b""
            wide = [int.from_bytes(payload[i:i + 8], "little") for i in range(0, len(payload) - 7, 8)]
            if usize == _U32_MAX and wide:
                usize = wide.pop(0)
            if csize == _U32_MAX and wide:
                csize = wide.pop(0)
        if (csize, usize) != (record.compressed_size, record.size):
            self._note(self.findings, "size-mismatch", record.name,
                       f"member {record.name!r}: the local header says {csize} compressed / {usize} "
                       f"bytes, the central directory {record.compressed_size} / {record.size}",
                       record.header_offset)

    # -- findings across entries
    def _check_nested(self, view: memoryview) -> None:
        """Members whose content starts like an archive; stored ones are screened in bulk first."""
        _, data, csize, _, method, _, flags = self._arrays
        readable = flags & _ENCRYPTION_FLAGS == 0
        stored = np.flatnonzero(readable & (method == STORED))
        candidates = np.flatnonzero(readable & (method == DEFLATED)).tolist()
        hit = np.zeros(len(stored), dtype=bool)
        for offset, magic, _ in _NESTED_SIGNATURES:
            fits = np.flatnonzero(csize[stored] >= offset + len(magic))
            if len(fits):
                # The first two bytes screen; candidates are confirmed in full below.
                at = data[stored[fits]] + offset
                hit[fits] |= (_bytes_at(view, at) == magic[0]) & (_bytes_at(view, at + 1) == magic[1])
        candidates += stored[hit].tolist()
        for i in candidates:
            start, size = int(data[i]), int(csize[i])
            if method[i] == STORED:
                head = bytes(view[start:start + min(size, _SNIFF_BYTES)])
            else:
                try:
                    head = zlib.decompressobj(-15).decompress(
                        bytes(view[start:start + min(size, _SNIFF_COMPRESSED)]), _SNIFF_BYTES)
                except zlib.error:
                    continue  # corrupt data is reported when it is read or its CRC checked
            for offset, magic, what in _NESTED_SIGNATURES:
                if head[offset:offset + len(magic)] == magic:
                    self._note(self.findings, "nested-archive", self._names[i],
                               f"member {self._names[i]!r} holds {what}", start)
                    break

    def _check_overlaps(self, cd_start: int, end_of_record: int) -> None:
        """Byte ranges (local header to end of data, and the directory) claimed twice."""
        header, data, csize = self._arrays[:3]
        starts = np.append(header, cd_start)
        ends = np.append(data + csize, end_of_record)
        order = np.argsort(starts, kind="stable")
        reach = np.maximum.accumulate(ends[order])
        if not (starts[order][1:] < reach[:-1]).any():
            return
        furthest, owner = -1, -1
        for index in order.tolist():
            start, end = int(starts[index]), int(ends[index])
            if start < furthest:
                self._note(self.findings, "overlapping-members", self._label(index),
                           f"{self._label_long(index)} (bytes {start}-{end}) overlaps "
                           f"{self._label_long(owner)}, which reaches offset {furthest}", start)
            if end > furthest:
                furthest, owner = end, index

    def _label(self, index: int) -> Optional[str]:
        return self._names[index] if index < len(self._names) else None

    def _label_long(self, index: int) -> str:
        return f"member {self._names[index]!r}" if index < len(self._names) else "the central directory"

    # -- inflating
    def _inflate(self, record: ZipMember, where: str) -> bytes:
        """The whole member, inflated in one call whose output is bounded by the declared size."""
        self._check_ratio(record, where)
        inflater = zlib.decompressobj(-15)
        with _byte_view(self._data, self.path) as whole:
            compressed = whole[record.data_offset:record.data_offset + record.compressed_size]
            try:
                out = inflater.decompress(compressed, record.size + 1)
            except zlib.error as exc:
                raise SourceError(f"{where}: corrupt deflate data ({exc})", path=self.path) from None
            finally:
                compressed.release()
        self._check_inflated(inflater, len(out), record, where)
        return out

    def _inflate_pieces(self, record: ZipMember, where: str) -> Iterator[bytes]:
        """The member inflated piece by piece; memory stays at one piece whatever the size."""
        self._check_ratio(record, where)
        inflater = zlib.decompressobj(-15)
        total = 0
        end = record.data_offset + record.compressed_size
        for start in range(record.data_offset, end, _INFLATE_INPUT_CHUNK):
            with _byte_view(self._data, self.path) as whole:
                pending: bytes = bytes(whole[start:min(start + _INFLATE_INPUT_CHUNK, end)])
            while pending and not inflater.eof and total <= record.size:
                try:
                    out = inflater.decompress(pending, min(_INFLATE_OUTPUT_CHUNK, record.size - total + 1))
                except zlib.error as exc:
                    raise SourceError(f"{where}: corrupt deflate data ({exc})", path=self.path) from None
                pending = inflater.unconsumed_tail
                total += len(out)
                if total <= record.size:
                    yield out
            if total > record.size or inflater.eof:
                break
        self._check_inflated(inflater, total, record, where)

    def _check_ratio(self, record: ZipMember, where: str) -> None:
        if record.size > _DEFLATE_MAX_RATIO * record.compressed_size + _DEFLATE_RATIO_SLACK:
            raise SourceError(f"{where} declares {record.size} bytes from {record.compressed_size} "
                              "compressed bytes, more than deflate can expand: the size is a lie",
                              path=self.path)

    def _check_inflated(self, inflater, total: int, record: ZipMember, where: str) -> None:
        if total > record.size:
            raise SourceError(f"{where} inflates to more than its declared {record.size} bytes "
                              "(a zip bomb or a size lie); inflating stopped there", path=self.path)
        # A member with no compressed bytes at all is empty (zipfile reads it so too).
        if not inflater.eof and record.compressed_size:
            raise SourceError(f"{where}: the deflate stream ends before its end marker (truncated or "
                              f"corrupt after {total} bytes)", path=self.path)
        if total < record.size:
            raise SourceError(f"{where} inflates to {total} bytes but declares {record.size}",
                              path=self.path)

    # -- findings bookkeeping
    def _note(self, into: list[ZipFinding], kind: str, member: Optional[str], detail: str,
              offset: int) -> None:
        count = self._counts.get(kind, 0) + 1
        self._counts[kind] = count
        if count <= MAX_FINDINGS_PER_KIND:
            into.append(ZipFinding(kind, member, detail, offset))

    def _summarize_findings(self, into: list[ZipFinding]) -> None:
        for kind in sorted({f.kind for f in into}):
            extra = self._counts.get(kind, 0) - MAX_FINDINGS_PER_KIND
            if extra > 0:
                self._counts[kind] = MAX_FINDINGS_PER_KIND
                into.append(ZipFinding(kind, None, f"{extra} more {kind!r} findings not listed", -1))

    def __repr__(self) -> str:
        return f"ZipArchive({self.path!r}, {len(self._names)} members, {len(self.findings)} findings)"


def _byte_view(data: Buffer, path: str) -> memoryview:
    """A flat byte view of `data`; the caller releases it (so that an mmap can still be closed)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise SourceError(f"a zip archive must be read from bytes, a bytearray, an mmap or a "
                          f"memoryview, not {type(data).__name__}", path=path) from None
    if not view.c_contiguous:
        view.release()
        raise SourceError("a zip archive must be read from a contiguous buffer", path=path)
    if view.format != "B" or view.ndim != 1:
        with view:
            return view.cast("B")
    return view


def _records(buffer: "bytes | memoryview", offsets: np.ndarray, layout: np.dtype) -> np.ndarray:
    """The fixed-size records at `offsets` (bounds already checked) as a structured array (a copy)."""
    if not len(offsets):
        return np.zeros(0, dtype=layout)
    table = np.frombuffer(buffer, dtype=np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(table, layout.itemsize)
    try:
        rows = windows[offsets]  # fancy indexing: a C-contiguous copy, one row per record
    finally:
        del table, windows  # no array over the buffer may outlive the call
    return rows.view(layout)[:, 0]


def _signatures(buffer: bytes, signature: int, record_size: int) -> np.ndarray:
    """Offsets where a 4-byte little-endian `signature` starts a record of `record_size` bytes."""
    table = np.frombuffer(buffer, dtype=np.uint8)
    tail = record_size - 1
    hit = table[:len(table) - tail] == signature & 0xFF
    for k in range(1, 4):
        hit &= table[k:len(table) - tail + k] == (signature >> 8 * k) & 0xFF
    return np.flatnonzero(hit)


def _bytes_at(view: memoryview, positions: np.ndarray) -> np.ndarray:
    """The bytes at `positions` (bounds already checked), as a uint8 array (a copy)."""
    table = np.frombuffer(view, dtype=np.uint8)
    try:
        return table[positions]
    finally:
        del table


def _differ(view: memoryview, starts: np.ndarray, expected: np.ndarray, expected_starts: np.ndarray,
            lengths: np.ndarray) -> np.ndarray:
    """Per span, whether the `lengths[i]` bytes of `view` at `starts[i]` differ from those of
    `expected` at `expected_starts[i]` (all bounds already checked). Done in blocks so that
    the index arrays stay small whatever the total length."""
    differ = np.zeros(len(starts), dtype=bool)
    ends = np.cumsum(lengths)
    table = np.frombuffer(view, dtype=np.uint8)
    try:
        first = 0
        while first < len(starts):
            last = max(first + 1, int(np.searchsorted(ends, ends[first] + _COMPARE_BLOCK, side="right")))
            span_lengths = lengths[first:last]
            owner = np.repeat(np.arange(last - first), span_lengths)
            within = np.arange(int(span_lengths.sum())) - np.repeat(np.cumsum(span_lengths) - span_lengths,
                                                                   span_lengths)
            actual = table[starts[first:last][owner] + within]
            wanted = expected[expected_starts[first:last][owner] + within]
            differ[first:last] = np.bincount(owner, weights=actual != wanted, minlength=last - first) > 0
            first = last
    finally:
        del table
    return differ


def _u32(view: memoryview, at: int) -> int:
    """The 32-bit value at `at`, or -1 where fewer than 4 bytes remain."""
    if at < 0 or at + 4 > len(view):
        return -1
    return int.from_bytes(view[at:at + 4], "little")


def _extra_field(extra: bytes, wanted: int) -> Optional[bytes]:
    """The data of the first extra field with id `wanted`; None if absent or the list is malformed."""
    at = 0
    while at + 4 <= len(extra):
        field_id, length = _EXTRA_HEADER.unpack_from(extra, at)
        if at + 4 + length > len(extra):
            return None
        if field_id == wanted:
            return extra[at + 4:at + 4 + length]
        at += 4 + length
    return None


def _unsafe_name_reasons(name: str) -> list[str]:
    """Why extracting a member by this name would be unsafe (empty when it is not)."""
    return [why for test, why in (
        (name.startswith(("/", "\\")) or (name[1:2] == ":" and name[:1].isalpha()), "is an absolute path"),
        (".." in name.replace("\\", "/").split("/"), "climbs out of its directory with '..'"),
        ("\\" in name, "holds a backslash"),
        ("\x00" in name, "holds a NUL byte"),
    ) if test]
