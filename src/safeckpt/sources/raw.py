"""Raw tensor dumps (arrays written back to back, no header) read against a template.

Some exporters write the plain concatenation of their arrays' bytes
(``b"".join(t.numpy().tobytes() for t in state_dict.values())``). Nothing in
such a file says where one tensor ends, so a *template* gives each tensor's
name, dtype and shape in file order:

* a JSON file (or the same, already parsed, as a dict)::

      {"tensors": [{"name": "w", "dtype": "F32", "shape": [2, 3]}, ...],
       "offset": 0, "byteorder": "little"}

  ``offset`` (bytes skipped at the start) and ``byteorder`` (``"little"`` or
  ``"big"``) are optional; the simple form ``{"w": {"dtype": "F32", "shape":
  [2, 3]}, ...}`` lists the tensors in file order with offset 0, little-endian;
* a ``.safetensors`` file: its tensors' names, dtypes and shapes in the order
  of their data (the file's own data is not used).

dtypes are safetensors dtype names (``F32``, ``BF16``, ``F8_E4M3``, ...; F4 is
packed two values to a byte, as in safetensors). Tensors are packed from
``offset`` with no padding; their sizes must add up to the file's size exactly
(``allow_trailing=True`` accepts bytes after the last one, for exporters that
pad). Tensors are zero-copy read-only views of the mapped file; big-endian dumps
are byte-swapped into little-endian copies when read.

    >>> with RawSource("model.bin", "model.template.json") as src:
    ...     src.read("embed.weight").shape
    (32000, 4096)
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES, DType, storage_dtype
from ..format.header import LENGTH_PREFIX, check_shape, tensor_nbytes
from ..format.reader import SafetensorsFile, to_logical
from ..format.storage import open_regular_file
from .base import TensorInfo, TensorSource
from .base import map_file, unmap

# A template is a small JSON file; like the safetensors header it describes, it may not
# make us parse more than the format's own header limit.
MAX_TEMPLATE_BYTES = 100_000_000
BYTEORDERS = ("little", "big")
TEMPLATE_KEYS = ("tensors", "offset", "byteorder")
ENTRY_KEYS = ("name", "dtype", "shape")
# Bytes swapped as one unit for big-endian data: the itemsize, except complex numbers
# (two floats each).
_SWAP_UNIT = {"C64": 4}


class TemplateEntry(NamedTuple):
    """One tensor of a raw dump: where its bytes are and what they are."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class Template(NamedTuple):
    """A checked template: the tensors in file order, the start offset, the byte order."""

    entries: list[TemplateEntry]
    offset: int
    byteorder: str

    @property
    def end(self) -> int:
        """Where the last tensor ends: the size a dump of this template has."""
        return self.entries[-1].offset + self.entries[-1].nbytes if self.entries else self.offset


def load_template(template: "os.PathLike | str | dict") -> Template:
    """Read and check a template: a JSON file, a safetensors file, or a parsed dict.

    >>> load_template({"w": {"dtype": "F32", "shape": [2, 3]}}).entries[0].nbytes
    24
    """
    if isinstance(template, dict):
        return parse_template(template, "<template>")
    path = os.fspath(template)
    with open_regular_file(path) as f:
        raw = f.read(MAX_TEMPLATE_BYTES + 1)
    if _is_safetensors(raw, os.path.getsize(path)):
        return template_from_safetensors(path)
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise errors.SourceError(f"the template is larger than {MAX_TEMPLATE_BYTES} bytes; a template "
                                 "is a short JSON list of names, dtypes and shapes", path=path)
    try:
        parsed = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicates(path))
    except UnicodeDecodeError as exc:
        raise errors.SourceError(f"the template is neither a safetensors file nor UTF-8 JSON "
                                 f"({exc.reason} at byte {exc.start})", path=path) from None
    except RecursionError:
        raise errors.SourceError("the template's JSON is nested too deeply", path=path) from None
    except ValueError as exc:
        raise errors.SourceError(f"the template is neither a safetensors file nor valid JSON: {exc}",
                                 path=path) from None
    return parse_template(parsed, path)


def _is_safetensors(head: bytes, size: int) -> bool:
    # 8-byte little-endian header length, then the header's opening brace.
    n = int.from_bytes(head[:LENGTH_PREFIX], "little")
    return (len(head) > LENGTH_PREFIX and head[LENGTH_PREFIX:LENGTH_PREFIX + 1] == b"{"
            and n <= size - LENGTH_PREFIX)


def _no_duplicates(path: str):
    def hook(pairs: list) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set = set()
            for key, _ in pairs:
                if key in seen:
                    raise errors.SourceError(f"the template names {key!r:.80} twice", path=path)
                seen.add(key)
        return out
    return hook


def template_from_safetensors(path: "os.PathLike | str") -> Template:
    """The template a safetensors file gives: its tensors in the order of their data."""
    with SafetensorsFile(path) as f:
        tensors = sorted(f.header.tensors.items(), key=lambda item: item[1].data_offsets[0])
    return _packed([(name, DTYPES[t.dtype], tuple(t.shape)) for name, t in tensors], 0, "little",
                   os.fspath(path))


def parse_template(template: Any, path: str) -> Template:
    """Check a parsed template (either form) and lay its tensors out back to back."""
    if not isinstance(template, dict):
        raise errors.SourceError(f"the template is a {type(template).__name__}, not a JSON object",
                                 path=path)
    if isinstance(template.get("tensors"), list):
        extra = [k for k in template if k not in TEMPLATE_KEYS]
        if extra:
            raise errors.SourceError(f"the template has unexpected keys {extra!r:.100}; it may have "
                                     f"{', '.join(TEMPLATE_KEYS)}", path=path)
        offset = template.get("offset", 0)
        if type(offset) is not int or offset < 0:
            raise errors.SourceError(f"the template's offset is {offset!r:.40}, not a non-negative "
                                     "integer", path=path)
        byteorder = template.get("byteorder", "little")
        if byteorder not in BYTEORDERS:
            raise errors.SourceError(f"the template's byteorder is {byteorder!r:.40}, not 'little' "
                                     "or 'big'", path=path)
        rows = [_entry_fields(entry, i, path) for i, entry in enumerate(template["tensors"])]
    else:
        offset, byteorder = 0, "little"
        rows = []
        for name, entry in template.items():
            if not isinstance(entry, dict):
                raise errors.SourceError(
                    f"the template's entry is a {type(entry).__name__}; use {{\"name\": {{\"dtype\": "
                    "..., \"shape\": [...]}}, ...}} or {\"tensors\": [...]}", path=path, tensor=name)
            rows.append(_entry_fields({"name": name, **entry}, len(rows), path))
    seen: set = set()
    for name, _, _ in rows:
        if name in seen:
            raise errors.SourceError("the template names this tensor twice", path=path, tensor=name)
        seen.add(name)
    return _packed(rows, offset, byteorder, path)


def _entry_fields(entry: Any, index: int, path: str) -> tuple[str, DType, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise errors.SourceError(f"tensor {index} of the template is a {type(entry).__name__}, not "
                                 "an object with name, dtype and shape", path=path)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise errors.SourceError(f"tensor {index} of the template has no name (a non-empty string)",
                                 path=path)
    missing = [k for k in ENTRY_KEYS if k not in entry]
    extra = [k for k in entry if k not in ENTRY_KEYS]
    if missing or extra:
        raise errors.SourceError("a template entry needs exactly name, dtype and shape"
                                 + (f"; missing {missing}" if missing else "")
                                 + (f"; unexpected {extra!r:.80}" if extra else ""), path=path, tensor=name)
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise errors.SourceError(f"unknown dtype {entry['dtype']!r:.40}; the template uses safetensors "
                                 f"dtype names: {', '.join(DTYPES)}", path=path, tensor=name)
    shape = entry["shape"]
    if not isinstance(shape, (list, tuple)):
        raise errors.SourceError(f"shape is {shape!r:.40}, not a list of integers", path=path, tensor=name)
    try:
        return name, dtype, check_shape(shape, path, name)
    except errors.HeaderError as exc:
        raise errors.SourceError(exc.detail, path=path, tensor=name) from None


def _packed(rows: list, offset: int, byteorder: str, path: str) -> Template:
    entries, at = [], offset
    for name, dtype, shape in rows:
        try:
            nbytes = tensor_nbytes(dtype, shape, path, name)
        except errors.HeaderError as exc:
            raise errors.SourceError(exc.detail, path=path, tensor=name) from None
        entries.append(TemplateEntry(name, dtype, shape, at, nbytes))
        at += nbytes
    return Template(entries, offset, byteorder)


class RawSource(TensorSource):
    """A headerless dump of tensors, read against a template (see the module docstring).

    >>> src = RawSource("dump.bin", "model.safetensors")
    >>> src.read("lm_head.weight").dtype
    dtype(bfloat16)
    """

    format = "raw"

    def __init__(self, path: "os.PathLike | str", template: "os.PathLike | str | dict", *,
                 allow_trailing: bool = False) -> None:
        super().__init__(os.fspath(path))
        self.template_path = None if isinstance(template, dict) else os.fspath(template)
        self.template = load_template(template)
        self._map: Any = map_file(self.path)
        try:
            self._check_size(len(self._map), allow_trailing)
        except BaseException:
            self.close()
            raise
        self._entries = {e.name: e for e in self.template.entries}
        self._infos = {e.name: TensorInfo(e.dtype.name, e.shape, e.nbytes) for e in self.template.entries}

    def _check_size(self, size: int, allow_trailing: bool) -> None:
        t = self.template
        expected = t.end
        what = f"the template describes {expected} bytes ({t.offset} skipped + {expected - t.offset} " \
               f"of {len(t.entries)} tensors)"
        if expected > size:
            raise errors.SourceError(f"{what} but the file has {size}: {expected - size} bytes short; "
                                     "is the template for this file?", path=self.path)
        if expected < size:
            if not allow_trailing:
                raise errors.SourceError(f"{what} but the file has {size}: {size - expected} bytes more; "
                                         "pass allow_trailing=True if the exporter pads its dumps",
                                         path=self.path)
            self.notes.append(f"{size - expected} bytes after the last tensor are not read")

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        self[name]  # a clear TensorNotFoundError for an unknown name
        if self._map is None:
            raise errors.SourceError("the source is closed", path=self.path, tensor=name)
        e = self._entries[name]
        stored = storage_dtype(e.dtype)
        unit = _SWAP_UNIT.get(e.dtype.name, stored.itemsize)
        if self.template.byteorder == "big" and unit > 1:
            raw = np.frombuffer(self._map, np.dtype(f"<u{unit}"), e.nbytes // unit, e.offset)
            storage = raw.byteswap().view(stored)
        else:
            storage = np.frombuffer(self._map, stored, e.nbytes // stored.itemsize, e.offset)
        out = to_logical(storage, e.dtype, e.shape)
        out.flags.writeable = False
        return out

    def describe(self) -> str:
        source = f"template {os.path.basename(self.template_path)}" if self.template_path else "a template"
        order = ", big-endian" if self.template.byteorder == "big" else ""
        return f"raw tensor dump, {len(self)} tensors read against {source}{order}"

    def close(self) -> None:
        unmap(self._map)
        self._map = None
