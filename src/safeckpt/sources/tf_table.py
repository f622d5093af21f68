"""TensorFlow's (LevelDB's) sorted string table, as TensorFlow writes a checkpoint's ``.index``; and CRC32C.

The table format (leveldb/doc/table_format.md; tensorflow/core/lib/io/table*)
-----------------------------------------------------------------------------
A table is a sequence of blocks, then a 48-byte footer::

    [data block 1] ... [data block N] [metaindex block] [index block] [footer]

The footer holds two *block handles* (a handle is two varint64s, offset and size),
the metaindex's then the index's, zero padding up to 40 bytes, and the 8-byte
little-endian magic number ``0xdb4775248b80fb57``.

Every block is followed by a 5-byte trailer: a compression type byte (0: none,
1: Snappy) and the masked CRC32C (below) of the block's bytes and the type byte.
A block's contents are entries, then a *restart array*::

    entry:   shared (varint32) | non_shared (varint32) | value_length (varint32)
             | key_delta (non_shared bytes) | value (value_length bytes)
    tail:    restart offsets (uint32 LE each) | number of restarts (uint32 LE)

An entry's key is the first ``shared`` bytes of the previous entry's key followed by
``key_delta`` (prefix compression); a restart point is the offset of an entry with
``shared == 0``, where a reader may start decoding. Keys are in strictly increasing
byte order across the whole table. The index block maps, for each data block, a key
at or after the block's last key to the block's handle (its value); the metaindex
is empty in the tables TensorFlow writes.

CRC32C is the Castagnoli CRC (polynomial 0x1EDC6F41, reflected, init and final xor
0xFFFFFFFF). TensorFlow stores CRCs *masked* (so that a CRC of data holding CRCs is
not degenerate): ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` modulo 2**32.

What this module does
---------------------
`read_table(data)` checks the footer, every block handle, trailer, CRC and restart
point and every entry's lengths, and returns the ``(key, value)`` pairs in order;
Snappy-compressed blocks are refused with a message saying so (TensorFlow never
writes them into checkpoints). Errors are `errors.SourceError` naming the file and
the byte at fault.

`crc32c` uses Google's ``google-crc32c`` package (a C extension, several GB/s) when it
is installed, else a table-driven pure-Python loop (about 5-10 MB/s: fine for index
blocks, slow for checking large tensors, so install the package for those).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

from .. import errors

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
_MASK_DELTA = 0xA282EAD8
# Bytes of a view copied at a time to compute its CRC (google-crc32c reads bytes objects only).
CRC_CHUNK = 1 << 20


class BlockHandle(NamedTuple):
    """Where a block lies in the table: `size` bytes from `offset` (the trailer follows)."""

    offset: int
    size: int


def _varint(data: Any, pos: int, end: int, bits: int, path: str, what: str) -> tuple[int, int]:
    """(value, position after it) of a varint of at most `bits` bits that ends before `end`."""
    result = shift = 0
    while shift < bits:
        if pos >= end:
            raise errors.SourceError(f"{what}: a varint runs past its end (byte {pos})", path=path)
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >> bits:
                break
            return result, pos
        shift += 7
    raise errors.SourceError(f"{what}: a varint before byte {pos} does not fit in {bits} bits", path=path)


# --- CRC32C --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


def _crc32c_python(crc: int, data: bytes) -> int:
    """`crc` (of the data before) extended by `data`, one byte at a time."""
    table, crc = _crc_table(), crc ^ 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@functools.lru_cache(maxsize=1)
def _crc32c_extend() -> Callable[[int, bytes], int]:
    try:
        import google_crc32c
    except ImportError:
        return _crc32c_python
    return google_crc32c.extend


def crc32c(data: Any, crc: int = 0) -> int:
    """The CRC32C of `data` (bytes, memoryview, mmap slice); `crc`: that of the bytes before it.

    google-crc32c takes only ``bytes``, so a view is handed over in chunks of
    `CRC_CHUNK` bytes copied out of it (memory stays bounded for a tensor of any size).

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    extend = _crc32c_extend()
    if isinstance(data, bytes):
        return extend(crc, data)
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CRC_CHUNK):
        crc = extend(crc, bytes(view[start:start + CRC_CHUNK]))
    return crc


def masked_crc32c(data: Any) -> int:
    """The CRC32C of `data`, masked as TensorFlow and LevelDB store it."""
    return mask(crc32c(data))


def mask(crc: int) -> int:
    """A CRC32C masked as TensorFlow and LevelDB store it."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --- the table ---------------------------------------------------------------------

def read_footer(data: Any, path: str) -> tuple[BlockHandle, BlockHandle]:
    """(metaindex handle, index handle) from the table's last 48 bytes; checks the magic."""
    if len(data) < FOOTER_SIZE:
        raise errors.SourceError(f"is {len(data)} bytes, shorter than the {FOOTER_SIZE}-byte footer of a "
                                 "TensorFlow checkpoint index (truncated?)", path=path)
    start = len(data) - FOOTER_SIZE
    if int.from_bytes(data[len(data) - 8:], "little") != MAGIC:
        raise errors.SourceError("does not end with the table magic number 0xdb4775248b80fb57: it is not a "
                                 "TensorFlow checkpoint index, or it is truncated", path=path)
    handles, pos = [], start
    for _ in range(2):
        offset, pos = _varint(data, pos, start + 40, 64, path, "the footer")
        size, pos = _varint(data, pos, start + 40, 64, path, "the footer")
        handles.append(BlockHandle(offset, size))
    return handles[0], handles[1]


def read_block(data: Any, handle: BlockHandle, limit: int, path: str, what: str) -> memoryview:
    """A block's contents after checking that it and its trailer lie before `limit`, that it is
    not compressed and that its CRC matches."""
    if handle.offset + handle.size + BLOCK_TRAILER_SIZE > limit:
        raise errors.SourceError(f"{what} at byte {handle.offset} of {handle.size} bytes (+{BLOCK_TRAILER_SIZE} "
                                 f"of trailer) lies outside the table's {limit} bytes", path=path)
    end = handle.offset + handle.size
    kind = data[end]
    if kind == SNAPPY_COMPRESSION:
        raise errors.SourceError(f"{what} is Snappy-compressed; TensorFlow never writes checkpoint indexes "
                                 "that way and this reader does not decompress them", path=path)
    if kind != NO_COMPRESSION:
        raise errors.SourceError(f"{what} has compression type {kind}; only 0 (none) is defined", path=path)
    stored = int.from_bytes(data[end + 1:end + BLOCK_TRAILER_SIZE], "little")
    view = memoryview(data)[handle.offset:end + 1]
    actual = masked_crc32c(view)
    if actual != stored:
        raise errors.SourceError(f"{what} at byte {handle.offset}: CRC32C mismatch (stored {stored:#010x}, "
                                 f"computed {actual:#010x}), the index file is damaged", path=path)
    return view[:-1]


def block_entries(block: memoryview, path: str, what: str) -> list[tuple[bytes, memoryview]]:
    """The ``(key, value)`` entries of one block, checking every length and restart point."""
    size = len(block)
    if size < 4:
        raise errors.SourceError(f"{what} is {size} bytes, too short to hold its restart count", path=path)
    restarts = int.from_bytes(block[size - 4:], "little")
    if restarts > (size - 4) // 4:
        raise errors.SourceError(f"{what} declares {restarts} restart points, more than its {size} bytes hold",
                                 path=path)
    entries_end = size - 4 - 4 * restarts
    points = [int.from_bytes(block[entries_end + 4 * i:entries_end + 4 * i + 4], "little")
              for i in range(restarts)]
    out: list[tuple[bytes, memoryview]] = []
    starts: set[int] = set()
    pos, key = 0, b""
    while pos < entries_end:
        entry = pos
        shared, pos = _varint(block, pos, entries_end, 32, path, what)
        non_shared, pos = _varint(block, pos, entries_end, 32, path, what)
        value_length, pos = _varint(block, pos, entries_end, 32, path, what)
        if shared > len(key):
            raise errors.SourceError(f"{what}: the entry at byte {entry} shares {shared} bytes with a previous "
                                     f"key of {len(key)} bytes", path=path)
        if non_shared + value_length > entries_end - pos:
            raise errors.SourceError(f"{what}: the entry at byte {entry} runs past the entries' end "
                                     f"({non_shared} + {value_length} bytes from byte {pos})", path=path)
        if shared == 0:
            starts.add(entry)
        key = key[:shared] + bytes(block[pos:pos + non_shared])
        pos += non_shared
        out.append((key, block[pos:pos + value_length]))
        pos += value_length
    if any(p not in starts for p in points) or points != sorted(set(points)) or (out and points[:1] != [0]):
        raise errors.SourceError(f"{what}: its restart points {points[:8]}{'...' if restarts > 8 else ''} are not "
                                 "the starts of entries with no shared prefix", path=path)
    return out


def decode_handle(value: Any, path: str, what: str) -> BlockHandle:
    """A block handle stored as an index block's value."""
    offset, pos = _varint(value, 0, len(value), 64, path, what)
    size, pos = _varint(value, pos, len(value), 64, path, what)
    return BlockHandle(offset, size)


def read_table(data: Any, path: str) -> list[tuple[bytes, memoryview]]:
    """Every ``(key, value)`` of the table in `data`, in order; values are views of `data`.

    >>> [key for key, _ in read_table(open("ckpt-1.index", "rb").read(), "ckpt-1.index")][:2]
    [b'', b'_CHECKPOINTABLE_OBJECT_GRAPH']
    """
    _, index_handle = read_footer(data, path)
    limit = len(data) - FOOTER_SIZE
    index = block_entries(read_block(data, index_handle, limit, path, "the index block"), path, "the index block")
    out: list[tuple[bytes, memoryview]] = []
    for n, (_, value) in enumerate(index):
        handle = decode_handle(value, path, f"the index block's entry {n}")
        if handle.offset + handle.size > index_handle.offset:
            raise errors.SourceError(f"data block {n} at byte {handle.offset} overlaps the index block", path=path)
        what = f"data block {n} (byte {handle.offset})"
        for key, item in block_entries(read_block(data, handle, limit, path, what), path, what):
            if out and key <= out[-1][0]:
                raise errors.SourceError(f"{what}: key {key[:80]!r} is not after the previous key "
                                         f"{out[-1][0][:80]!r}; a table's keys are sorted and unique", path=path)
            out.append((key, item))
    return out
