"""A zip archive as each loader reads it: miniz for torch.load, zipfile for numpy.load.

Zip readers disagree on hostile archives, and a scanner that reads an archive its
own way grades a file the loader never sees. So the scan asks, for each loader,
which bytes it would unpickle:

* ``torch.load`` opens a file that starts with ``PK\\x03\\x04`` with miniz
  (``PyTorchStreamReader``, torch's vendored miniz 3.0.2; see `MinizArchive`):
  the end record is the *last* signature in the file's tail that leaves 22 bytes
  after it, whatever its comment length; a ZIP64 locator right before it sends
  it to the ZIP64 end record at the locator's offset; the central directory and
  local headers are at absolute offsets (bytes put in front of an archive are
  not allowed for); the archive's prefix is the first entry's name up to its
  first ``/``; ``<prefix>/data.pkl`` is looked up in the directory sorted
  case-insensitively (ASCII), by binary search, so ``ARCHIVE/DATA.PKL`` can be the
  one it unpickles. CRCs are not checked.
* ``numpy.load`` opens a file that starts with ``PK\\x03\\x04`` or ``PK\\x05\\x06``
  with Python's own `zipfile` (so that the scan reads exactly what the running
  Python's numpy reads): bzip2 and LZMA members included, the last entry of a
  name wins, a name ends at its first NUL.

`member_bytes` reads a member's bytes as stored (no CRC, no encryption flag
checked: torch reads what is there) with every length bounded.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

from ...sources.base import ViewFile

__all__ = ["MinizArchive", "LoaderMember", "miniz_directory", "zipfile_directory", "data_offset", "member_bytes",
           "zipfile_archive", "zipfile_members", "zipfile_head", "zipfile_read", "MAX_ZIPFILE_DIRECTORY"]

# The central directory Python's zipfile is asked to list: it builds a ZipInfo per
# entry (about a kilobyte each), so a larger one is left to the scan's own reader.
MAX_ZIPFILE_DIRECTORY = 32 << 20
# miniz's own limits: the end record is searched for within this many bytes of the end.
_MINIZ_CHUNK = 4096
_MINIZ_TAIL = 0xFFFF + 22

_EOCD = struct.Struct("<I4H2IH")
_LOCATOR = struct.Struct("<IIQI")
_EOCD64 = struct.Struct("<IQ2H2I4Q")
_CENTRAL = struct.Struct("<I6H3I5H2I")
_LOCAL = struct.Struct("<I5H3I2H")
_EOCD_SIG, _LOCATOR_SIG, _EOCD64_SIG = b"PK\x05\x06", 0x07064B50, 0x06064B50
_CENTRAL_SIG, _LOCAL_SIG = 0x02014B50, 0x04034B50
_U32_MAX = 0xFFFFFFFF
_FLAG_MASKED_HEADERS = 0x2000
STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
# Methods zipfile reads (numpy.load's npz members may use them): stored, deflated, bzip2, LZMA.
ZIPFILE_METHODS = frozenset([STORED, DEFLATED, BZIP2, LZMA])


@dataclass(frozen=True)
class LoaderMember:
    """One central-directory entry as a loader reads it; offsets are absolute in the file."""

    name: str            # for messages (the raw name decoded leniently)
    raw_name: bytes
    header_offset: int
    compressed_size: int
    size: int
    method: int
    flags: int


class MinizArchive:
    """The archive torch.load sees, or ValueError where miniz refuses to open it.

    >>> archive = MinizArchive(memoryview(open("model.pt", "rb").read()))
    >>> archive.entries[archive.locate(archive.prefix + b"/data.pkl")].name
    'archive/data.pkl'
    """

    def __init__(self, view: memoryview) -> None:
        self.size = len(view)
        cd_offset, cd_size, count, disk = _miniz_directory(view)
        self.directory = (cd_offset, cd_size, count)
        self.entries = _miniz_entries(view, cd_offset, cd_size, count, self.size, disk)
        first = self.entries[0].raw_name if self.entries else b""
        self.prefix: Optional[bytes] = first.split(b"/", 1)[0] if b"/" in first else None
        self._sorted: Optional[list[int]] = None  # sorted on the first lookup, as miniz sorts on opening

    def locate(self, name: bytes) -> Optional[int]:
        """The entry miniz's lookup of `name` finds (binary search, case-insensitive), or None."""
        key = _fold(name.split(b"\0", 1)[0])  # a C string ends at its first NUL
        if self._sorted is None:
            self._sorted = _miniz_heapsort(self.entries)
        low, high = 0, len(self._sorted) - 1
        while low <= high:
            middle = low + ((high - low) >> 1)
            index = self._sorted[middle]
            candidate = _fold(self.entries[index].raw_name)
            if candidate == key:
                return index
            if _less(candidate, key):
                low = middle + 1
            else:
                high = middle - 1
        return None

    def matching(self, name: bytes) -> list[int]:
        """Every entry whose name equals `name` case-insensitively: whichever one a lookup
        finds (duplicates sort in an order a heap sort decides), the scan reads them all."""
        key = _fold(name.split(b"\0", 1)[0])
        return [i for i, e in enumerate(self.entries) if _fold(e.raw_name) == key]


def miniz_directory(view: memoryview) -> Optional[tuple[int, int, int]]:
    """Where miniz finds the central directory: (offset, size, entries), None if it refuses."""
    try:
        return _miniz_directory(view)[:3]
    except (ValueError, struct.error):
        return None


def _miniz_directory(view: memoryview) -> tuple[int, int, int, int]:
    """mz_zip_reader_read_central_dir up to the entries: (offset, size, entries, this disk)."""
    size = len(view)
    eocd = _miniz_end_record(view)
    _, disk, cd_disk, on_disk, count, cd_size, cd_offset, _ = _EOCD.unpack_from(view, eocd)
    if eocd >= _LOCATOR.size + _EOCD64.size and _u32(view, eocd - _LOCATOR.size) == _LOCATOR_SIG:
        _, _, record, disks = _LOCATOR.unpack_from(view, eocd - _LOCATOR.size)
        if record > size - _EOCD64.size:
            raise ValueError("the ZIP64 locator points past the end of the file")
        if _u32(view, record) == _EOCD64_SIG:
            (_, rest, _, _, disk, cd_disk, on_disk, count, cd_size,
             cd_offset) = _EOCD64.unpack_from(view, record)
            if rest < _EOCD64.size - 12 or disks != 1 or count > _U32_MAX or cd_size > _U32_MAX:
                raise ValueError("a ZIP64 end record miniz refuses")
    if count != on_disk or ((disk | cd_disk) and (disk, cd_disk) != (1, 1)):
        raise ValueError("a multi-disk archive")
    if cd_size < count * _CENTRAL.size or cd_offset + cd_size > size:
        raise ValueError("the central directory does not fit in the file")
    return cd_offset, cd_size, count, disk


def _u32(view: memoryview, at: int) -> int:
    return int.from_bytes(view[at:at + 4], "little") if 0 <= at <= len(view) - 4 else -1


def _fold(name: bytes) -> bytes:
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def _less(a: bytes, b: bytes) -> bool:
    """miniz's filename order on folded names: bytes up to the shorter length, then length."""
    common = min(len(a), len(b))
    if a[:common] == b[:common]:
        return len(a) < len(b)
    return a[:common] < b[:common]


def _miniz_end_record(view: memoryview) -> int:
    """mz_zip_reader_locate_header_sig: the last signature with 22 bytes after it, searched
    backwards in 4 KiB chunks until ~64 KiB from the end."""
    size = len(view)
    if size < _EOCD.size:
        raise ValueError("too small to be a zip archive")
    at = max(size - _MINIZ_CHUNK, 0)
    while True:
        chunk = bytes(view[at:at + min(_MINIZ_CHUNK, size - at)])
        i = chunk.rfind(_EOCD_SIG, 0, max(0, min(len(chunk), size - at - _EOCD.size + 4)))
        if i >= 0:
            return at + i
        if at == 0 or size - at >= _MINIZ_TAIL:
            raise ValueError("no end of central directory record where miniz looks")
        at = max(at - (_MINIZ_CHUNK - 3), 0)


def _miniz_entries(view: memoryview, offset: int, size: int, count: int, file_size: int,
                   this_disk: int) -> list[LoaderMember]:
    directory = bytes(view[offset:offset + size])
    entries = []
    at = 0
    for _ in range(count):
        if size - at < _CENTRAL.size or int.from_bytes(directory[at:at + 4], "little") != _CENTRAL_SIG:
            raise ValueError("a central directory entry miniz refuses")
        fields = _CENTRAL.unpack_from(directory, at)
        flags, method, csize, usize = fields[3], fields[4], fields[8], fields[9]
        name_length, extra_length, comment_length, disk = fields[10], fields[11], fields[12], fields[13]
        header = fields[16]
        end = at + _CENTRAL.size + name_length + extra_length + comment_length
        if end > size:
            raise ValueError("a central directory entry runs past the directory")
        raw = directory[at + _CENTRAL.size:at + _CENTRAL.size + name_length]
        extra = directory[at + _CENTRAL.size + name_length:at + _CENTRAL.size + name_length + extra_length]
        if _U32_MAX not in (csize, usize) and ((method == STORED and usize != csize) or (usize and not csize)):
            raise ValueError("an entry whose sizes miniz refuses")
        if disk == 0xFFFF or (disk != this_disk and disk != 1) or flags & _FLAG_MASKED_HEADERS:
            raise ValueError("an entry miniz refuses (multi-disk or masked headers)")
        if csize != _U32_MAX and header + _LOCAL.size + csize > file_size:
            raise ValueError("an entry whose data runs past the end of the file")
        usize, csize, header = _zip64_fields(extra, usize, csize, header)
        entries.append(LoaderMember(raw.decode("utf-8", "replace"), raw, header, csize, usize, method, flags))
        at = end
    return entries


def _zip64_fields(extra: bytes, usize: int, csize: int, header: int) -> tuple[int, int, int]:
    """Sizes and offset held at 0xFFFFFFFF come from the ZIP64 extra field, in this order."""
    if _U32_MAX not in (usize, csize, header):
        return usize, csize, header
    at = 0
    while at + 4 <= len(extra):
        field_id, length = struct.unpack_from("<2H", extra, at)
        if field_id == 1:
            data, values, k = extra[at + 4:at + 4 + length], [usize, csize, header], 0
            for i in range(3):
                if values[i] == _U32_MAX and k + 8 <= len(data):
                    values[i] = int.from_bytes(data[k:k + 8], "little")
                    k += 8
            return values[0], values[1], values[2]
        at += 4 + length
    return usize, csize, header


def _miniz_heapsort(entries: list[LoaderMember]) -> list[int]:
    """mz_zip_reader_sort_central_dir_offsets_by_filename: the same heap sort, step for step,
    so that duplicate names come out in the order miniz's binary search sees them."""
    keys = [_fold(e.raw_name) for e in entries]
    order = list(range(len(entries)))
    size = len(order)
    if size <= 1:
        return order

    def sift(root: int, end: int) -> None:
        while True:
            child = 2 * root + 1
            if child >= end:
                return
            if child + 1 < end and _less(keys[order[child]], keys[order[child + 1]]):
                child += 1
            if not _less(keys[order[root]], keys[order[child]]):
                return
            order[root], order[child] = order[child], order[root]
            root = child

    for start in range((size - 2) // 2, -1, -1):
        sift(start, size)
    for end in range(size - 1, 0, -1):
        order[end], order[0] = order[0], order[end]
        sift(0, end)
    return order


def data_offset(view: memoryview, member: LoaderMember) -> Optional[int]:
    """Where a member's bytes start: after its local header's name and extra field."""
    at = member.header_offset
    if _u32(view, at) != _LOCAL_SIG or at + _LOCAL.size > len(view):
        return None
    fields = _LOCAL.unpack_from(view, at)
    return at + _LOCAL.size + fields[9] + fields[10]


def member_bytes(view: memoryview, start: int, compressed_size: int, size: int, method: int,
                 limit: int) -> Optional[memoryview]:
    """A member's uncompressed bytes as stored (flags and CRC ignored), at most `limit`;
    None when its data does not fit in the file or cannot be decompressed."""
    end = start + compressed_size
    if not 0 <= start <= end <= len(view):
        return None
    raw = view[start:end]
    if method == STORED:
        return raw[:limit]
    decompressor = {DEFLATED: lambda: zlib.decompressobj(-15), BZIP2: bz2.BZ2Decompressor,
                    LZMA: _zip_lzma}.get(method)
    if decompressor is None:
        return None
    try:
        return memoryview(_bounded(decompressor(), raw, limit))
    except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError):
        return None


def _bounded(decompressor, raw: memoryview, limit: int) -> bytes:
    """Decompress `raw`, stopping at `limit` bytes of output (the declared size is only a claim)."""
    out = bytearray()
    data = bytes(raw)
    while len(out) < limit:
        piece = decompressor.decompress(data, limit - len(out))
        out += piece
        if hasattr(decompressor, "unconsumed_tail"):  # zlib: the input it has not used yet
            data = decompressor.unconsumed_tail
            if not data or decompressor.eof:
                break
        else:  # bz2 and lzma keep their input: call again with none while output is pending
            data = b""
            if decompressor.eof or decompressor.needs_input:
                break
        if not piece:
            break
    return bytes(out)


class _zip_lzma:
    """LZMA in zip: a 4-byte version header and a 2-byte properties size, then raw LZMA1."""

    def __init__(self) -> None:
        self._inner = None
        self.eof = False
        self.needs_input = True

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            if len(data) < 4:
                raise ValueError("truncated LZMA header")
            props_size = int.from_bytes(data[2:4], "little")
            props = data[4:4 + props_size]
            filters = [lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)]  # as zipfile does
            self._inner = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)
            data = data[4 + props_size:]
        out = self._inner.decompress(data, max_length)
        self.eof, self.needs_input = self._inner.eof, self._inner.needs_input
        return out


def zipfile_archive(view: memoryview) -> Optional[zipfile.ZipFile]:
    """The archive as numpy.load's zipfile opens it, or None where zipfile refuses it.

    Raises OverflowError when its directory is too big to list here.
    """
    if _zipfile_directory_size(view) > MAX_ZIPFILE_DIRECTORY:
        raise OverflowError(f"a central directory of more than {MAX_ZIPFILE_DIRECTORY} bytes")
    try:
        return zipfile.ZipFile(ViewFile(view))
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError, struct.error):
        return None


def zipfile_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The members numpy.load's npz opens by name: the last entry of each name."""
    return list(archive.NameToInfo.values())


def zipfile_read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> Optional[bytes]:
    """A member's first `limit` bytes as zipfile's open() reads them (CRC not checked)."""
    try:
        with archive.open(info) as f:
            f._expected_crc = None  # numpy unpickles before zipfile's CRC check at the end
            return f.read(limit)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError, RuntimeError,
            struct.error, zlib.error, lzma.LZMAError):
        return None


def zipfile_head(view: memoryview, archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int) -> Optional[bytes]:
    """A member's first `size` bytes as zipfile reads them; a stored one is read straight from
    `view`, where zipfile's open() would find it (after the local header's name and extra)."""
    if info.compress_type != STORED or info.flag_bits & 0x1:
        return zipfile_read(archive, info, size)
    start = data_offset(view, LoaderMember(info.filename, b"", info.header_offset, info.compress_size,
                                           info.file_size, STORED, info.flag_bits))
    return None if start is None else bytes(view[start:start + min(size, info.compress_size)])


def zipfile_directory(view: memoryview) -> Optional[tuple[int, int]]:
    """Where zipfile finds the central directory (_EndRecData, _EndRecData64 and the prefix it
    allows for): (offset, size), or None where it finds no end record."""
    size = len(view)
    tail_start = max(0, size - (1 << 16) - _EOCD.size)
    tail = bytes(view[tail_start:])
    if tail[-_EOCD.size:-_EOCD.size + 4] == _EOCD_SIG and tail[-2:] == b"\0\0":
        at = len(tail) - _EOCD.size  # a record with no comment ends the file: taken first
    else:
        at = tail.rfind(_EOCD_SIG)
        if at < 0 or at + _EOCD.size > len(tail):
            return None
    eocd = tail_start + at
    cd_size, cd_offset = _EOCD.unpack_from(tail, at)[5:7]
    concat = eocd - cd_size - cd_offset
    record = eocd - _LOCATOR.size - _EOCD64.size  # zipfile assumes it right before the locator
    if record >= 0 and _u32(view, eocd - _LOCATOR.size) == _LOCATOR_SIG and _u32(view, record) == _EOCD64_SIG:
        cd_size, cd_offset = _EOCD64.unpack_from(view, record)[8:10]
        concat = eocd - cd_size - cd_offset - _LOCATOR.size - _EOCD64.size
    return cd_offset + concat, cd_size


def _zipfile_directory_size(view: memoryview) -> int:
    """The central directory size zipfile would read (0 where it finds none)."""
    directory = zipfile_directory(view)
    return 0 if directory is None else min(directory[1], len(view))  # no more than the file holds
