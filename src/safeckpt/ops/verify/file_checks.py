"""One checkpoint file: its structure, its manifest entry, and its check against an entry.

`open_layout` checks a file's structure and learns where its tensors' bytes lie.
safetensors: the strict reader (length prefix, header JSON, dtypes, shapes, tensors
tiling the data buffer). Other formats: their parser's checks, with every tensor read
once, and every tensor's bytes that have a place in the file must lie inside it. A Git
LFS pointer saved in place of the file is named as such, whatever the format.

`file_entry` hashes the file into its manifest entry, and `check_entry` compares the
file with one (see `safeckpt.ops.verify.manifest` for what an entry records): the first
damaged tensor is named, with its file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from ... import errors
from ...format.dtypes import dtype_for_numpy
from ...format.integrity import HASH, RANGES, compare_hashes, new_hasher, root_hash
from ...format.reader import SafetensorsFile
from ...format.storage import open_regular_file
from ...format.writer import tensor_chunks
from ...sources.base import TensorSource, mapped
from ...sources import open_source
from ...sources.detect import SNIFF_BYTES, sniff
from .lfs import refuse_pointer
from .range_hash import Meter, range_digests


@dataclass
class FileLayout:
    """What the structure check learned about one file; enough to hash it."""

    path: str
    format: str
    size: int
    tensors: dict[str, Optional[tuple[int, int]]]  # name -> its bytes in the file, or None: from its values
    parameters: int
    header: Optional[tuple[int, int]] = None  # safetensors: the header's bytes (the ranges tile the file)
    source: Optional[TensorSource] = None
    data: Any = None  # the file's bytes, mapped while hashing

    def ranges(self) -> tuple[list[Optional[str]], list[tuple[int, int]]]:
        """A safetensors file's ranges in file order, the header (named None) first: they tile the file."""
        spans = sorted((span, name) for name, span in self.tensors.items())
        return [None] + [name for _, name in spans], [self.header] + [span for span, _ in spans]


def read_head(path: str) -> bytes:
    """A file's first bytes, enough for `sniff`.

    >>> sniff(read_head("model.safetensors"))
    'safetensors'
    """
    with open_regular_file(path) as file:
        return file.read(SNIFF_BYTES)


@contextlib.contextmanager
def open_layout(path: str, is_index: bool = False) -> Iterator[FileLayout]:
    """Check one file's structure; the layout, with the file mapped for hashing.

    >>> with open_layout("model.safetensors") as layout:
    ...     entry = file_entry(layout, Meter(None))
    """
    head = read_head(path)
    if not is_index:
        refuse_pointer(path, head)
    with mapped(path) as data:
        size = len(data)
        if is_index:
            yield FileLayout(path, "index", size, {}, 0, data=data)
        elif path.endswith(".safetensors") or sniff(head) == "safetensors":
            with SafetensorsFile(path, backend="pread") as file:
                header = file.header
            start = header.data_start
            if start + header.data_size != size:  # changed between the two opens
                raise errors.SourceError("the file changed while it was being checked; check it again", path=path)
            yield FileLayout(path, "safetensors", size,
                             {name: (start + t.data_offsets[0], start + t.data_offsets[1])
                              for name, t in header.tensors.items()},
                             sum(t.numel for t in header.tensors.values()), (0, start), data=data)
        else:
            with open_source(path) as source:
                spans = _source_spans(source, size)
                parameters = sum(info.numel for name, info in source.infos.items() if name not in source.aliases)
                yield FileLayout(path, source.format, size, spans, parameters, source=source, data=data)


def _source_spans(source: TensorSource, size: int) -> dict[str, Optional[tuple[int, int]]]:
    """Each tensor's bytes in the file (checked to lie inside it), or None; tensors without
    a place in the file are read once, so that their parser checks them."""
    spans: dict[str, Optional[tuple[int, int]]] = {}
    for name in source.infos:
        span = source.file_span(name)
        if span is None or span.path != source.path:  # not in this file (a sharded index's shard)
            source.read(name)
            source.release(name)
            spans[name] = None
            continue
        _, offset, nbytes = span
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            raise errors.SourceError(f"the tensor's bytes [{offset}, {offset + nbytes}) run past the end of the "
                                     f"file ({size:,} bytes): it is truncated", path=source.path, tensor=name)
        spans[name] = (offset, offset + nbytes)
    return spans


# --- hashing and checking ---------------------------------------------------------------

def file_entry(layout: FileLayout, meter: Meter) -> dict:
    """The manifest entry of a file: its size and hash, each tensor's hash.

    >>> with open_layout("model.safetensors") as layout:
    ...     file_entry(layout, Meter(None))["hashed"]
    'ranges'
    """
    if layout.header is not None:
        names, ranges = layout.ranges()
        digests = list(range_digests(layout.data, ranges, meter, layout.path))
        return {"size": layout.size, HASH: root_hash(digests), "format": layout.format, "hashed": RANGES,
                "header": {"range": list(ranges[0]), HASH: digests[0]},
                "tensors": {name: {"range": list(span), HASH: digest}
                            for name, span, digest in zip(names[1:], ranges[1:], digests[1:])}}
    (whole,) = range_digests(layout.data, [(0, layout.size)], meter, layout.path)
    entry: dict[str, Any] = {"size": layout.size, HASH: whole, "format": layout.format}
    if layout.tensors:
        meter.expect(_tensor_bytes(layout), extra=True)
        entry["tensors"] = {name: ({"range": list(span)} if span else {"nbytes": layout.source.infos[name].nbytes})
                            | {HASH: digest}
                            for name, span, digest in _tensor_digests(layout, meter)}
    return entry


def check_entry(layout: FileLayout, entry: Mapping[str, Any], meter: Meter, advice: str) -> None:
    """Compare a file with its manifest entry; IntegrityError naming the first damaged tensor.

    `advice` ends each error's message: what the user should do about it.

    >>> with open_layout("model.safetensors") as layout:
    ...     check_entry(layout, entry, Meter(None), "; restore it")
    """
    path = layout.path
    recorded_format = entry.get("format")
    if recorded_format is not None and recorded_format != layout.format:
        raise errors.IntegrityError(f"the manifest records a {recorded_format} file, but this is a {layout.format} "
                                    "file (it was replaced)" + advice, path=path)
    recorded = entry.get("tensors", {})
    if layout.header is not None:
        check_ranges(layout, entry, meter, advice)
        return
    _compare_tensor_names(layout, recorded, advice)
    resized = _resized(layout, entry)
    (whole,) = range_digests(layout.data, [(0, layout.size)], meter, path)
    if whole == entry[HASH] and not resized:
        return
    meter.expect(_tensor_bytes(layout), extra=True)
    damaged = compare_hashes(((name, digest) for name, _, digest in _tensor_digests(layout, meter)), entry).tensor
    if damaged is not None:
        raise _damaged(path, damaged, resized, advice)
    raise errors.IntegrityError(f"its bytes differ from the manifest's hash{resized} outside the tensors' values "
                                "(its pickle, archive records or metadata changed)" + advice, path=path)


def check_ranges(layout: FileLayout, entry: Mapping[str, Any], meter: Meter, advice: str) -> None:
    """A safetensors file, range by range in file order (as `integrity` hashes a checkpoint's tensors),
    the ranges as its header lays them out; a damaged tensor is named before a changed header.

    >>> with open_layout("tensors.safetensors") as layout:
    ...     check_ranges(layout, manifest["files"]["tensors.safetensors"], Meter(None), "; restore another step")
    """
    if entry.get("hashed") != RANGES or not isinstance(entry.get("header"), Mapping):
        raise errors.IntegrityError("the manifest does not record this file's ranges; write it again with "
                                    "`safeckpt verify --write`", path=layout.path)
    _compare_tensor_names(layout, entry.get("tensors", {}), advice)
    resized = _resized(layout, entry)
    names, ranges = layout.ranges()
    check = compare_hashes(zip(names, range_digests(layout.data, ranges, meter, layout.path)), entry)
    if check.tensor is not None:
        raise _damaged(layout.path, check.tensor, resized, advice,
                       " (its header differs from the manifest's too)" if check.header_changed else "")
    if check.header_changed:
        raise errors.IntegrityError(f"its header (tensor names, dtypes, shapes, offsets or __metadata__) differs "
                                    f"from the manifest's hash{resized}, while every tensor's bytes match" + advice,
                                    path=layout.path)
    if resized or root_hash(check.digests) != entry[HASH]:
        raise errors.IntegrityError(f"its bytes differ from the manifest's hash{resized}" + advice, path=layout.path)


def _compare_tensor_names(layout: FileLayout, recorded: Mapping[str, Any], advice: str) -> None:
    gone = [name for name in recorded if name not in layout.tensors]
    if gone:
        raise errors.IntegrityError(f"the manifest records this tensor, and the file no longer holds it ({len(gone)} "
                                    "tensors are gone)" + advice, path=layout.path, tensor=gone[0])
    new = [name for name in layout.tensors if name not in recorded]
    if new:
        raise errors.IntegrityError(f"the file holds this tensor, and the manifest does not ({len(new)} tensors "
                                    "are new)" + advice, path=layout.path, tensor=new[0])


def _resized(layout: FileLayout, entry: Mapping[str, Any]) -> str:
    return "" if layout.size == entry["size"] else \
        f" (it is {layout.size:,} bytes; the manifest records {entry['size']:,})"


def _damaged(path: str, tensor: str, resized: str, advice: str, also: str = "") -> errors.IntegrityError:
    return errors.IntegrityError(f"the tensor's bytes differ from the manifest's BLAKE3 hash{resized}{also} (the "
                                 "file is damaged, or changed after the manifest was written)" + advice,
                                 path=path, tensor=tensor)


def _tensor_bytes(layout: FileLayout) -> int:
    return sum(layout.source.infos[name].nbytes for name in layout.tensors)


def _tensor_digests(layout: FileLayout, meter: Meter) -> Iterator[tuple[str, Optional[tuple[int, int]], str]]:
    """(name, span or None, hash) of every tensor: those with bytes in the file first, in file order."""
    placed = sorted((span, name) for name, span in layout.tensors.items() if span is not None)
    for (span, name), digest in zip(placed, range_digests(layout.data, [s for s, _ in placed], meter,
                                                           layout.path)):
        yield name, span, digest
    for name, span in layout.tensors.items():
        if span is None:
            yield name, None, _value_digest(layout.source, name, meter)


def _value_digest(source: TensorSource, name: str, meter: Meter) -> str:
    """BLAKE3 of a tensor's bytes as a safetensors file stores them, from its values."""
    array = source.read(name)
    hasher = new_hasher(array.nbytes)
    if dtype_for_numpy(array.dtype) is None:
        chunks: Any = [memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))]
    else:
        chunks = tensor_chunks(array)
    for chunk in chunks:
        hasher.update(chunk)
        meter.tick(chunk.nbytes, source.path)
    source.release(name)
    return hasher.hexdigest()


__all__ = ["FileLayout", "open_layout", "read_head", "file_entry", "check_entry", "check_ranges"]
