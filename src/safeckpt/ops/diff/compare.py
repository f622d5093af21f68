"""diff: compare two checkpoints tensor by tensor, streaming, in float64.

Both sides are opened with `open_source` (any format safeckpt reads), so a
Lightning ``.ckpt`` compares with the safetensors file converted from it.

Matching names
    Each side's tensors are chosen as `convert` chooses them
    (``choose_tensors(source, extract="auto")``: a Lightning / Stable Diffusion
    ``state_dict.`` prefix is removed), then tied names are expanded: a torch
    file's aliases, and in a safetensors file each metadata entry
    ``dropped -> kept`` whose key is not a tensor and whose value is (what
    ``safetensors.torch.save_model`` and our `convert` write for tied weights).
    So a tie stored once on one side and twice on the other is not a difference.

Status of each name (one `DiffEntry` per name)
    ``equal``      same dtype, shape and bytes (bit-identical; NaNs with the
                   same bits in the same places are equal)
    ``changed``    same dtype and shape, different bytes: value stats below
    ``dtype``      same shape, different dtype: value stats too, compared in
                   float64 ("is my bf16 cast close to the fp32?")
    ``shape``      different shapes: no value stats
    ``only_a`` / ``only_b``  the name is on one side only
    ``renamed``    a name only in A and a name only in B with the same dtype,
                   shape and bytes (BLAKE3 of the candidates that have a
                   partner of the same dtype and shape); the entry is A's name
                   with ``renamed_to`` B's

Value stats (A is the reference), in float64, over the pairs where both values
are finite:
    ``max_abs`` = max |a-b|, ``mean_abs`` = mean |a-b|,
    ``rel_l2`` = ||a-b|| / ||a|| (0 when both norms are 0, inf when only
    ||a|| is), ``cosine`` = a.b / (||a|| ||b||) (None when a norm is 0),
    ``changed_elements`` = elements whose values differ.
    A pair with a non-finite value matches when both are NaN (any NaN bits) or
    both are the same infinity; otherwise it is counted in
    ``nonfinite_mismatch`` (and in ``changed_elements``) and always fails a
    tolerance. Integers and bools are compared as float64 (their equality is
    exact through the byte comparison; int64 beyond 2**53 loses precision in
    the stats only). Complex values: |a-b| is the modulus of the difference,
    norms and dot products those of the real pairs (Re of a^H b). F6 types
    have no numpy type: they are compared as bytes only (no stats). Stats are
    None when no pair is finite. For ``equal`` tensors nothing is computed:
    max_abs = mean_abs = rel_l2 = 0, cosine = 1 and changed_elements = 0 by
    definition.

Tolerance (`atol` / `rtol`, like ``numpy.allclose`` with A as reference)
    element i fails when |a_i - b_i| > atol + rtol * |a_i| (a missing one of
    the two is 0). An entry's ``within_tolerance`` is set for ``equal``,
    ``changed`` and ``dtype`` entries; ``beyond_tolerance`` counts failing
    elements. `DiffReport.within_tolerance` is True when there is no
    structural difference (``only_a``, ``only_b``, ``shape`` and ``renamed``
    all count: a renamed key breaks ``load_state_dict``) and every compared
    tensor is within tolerance. A ``dtype`` entry is compared by its values:
    it passes when they are within tolerance (without a tolerance: when every
    value is equal after the cast), unless ``strict_dtype`` makes any dtype
    change a failure. Without a tolerance the gate is `identical` but for
    such dtype changes, and the entries' tolerance fields are None.

JSON (`DiffReport.to_dict`): non-finite floats are written as the strings
``"inf"``, ``"-inf"`` and ``"nan"``; a stat that does not apply is ``null``.

How it is fast: tensors are read as zero-copy views and compared in parts.
Bytes are compared first, and float math runs only once a part differs; the
sums of a part come from `diff_sums.part_sums` (numpy on blocks of 256K values,
BLAS for the dot products), which releases the GIL for its work. Tensors are
cut into parts of at most `PART_ELEMENTS` and queued a few tensors ahead on a
thread per core, so the threads share large tensors, take small ones in turn
and never wait for each other; the calling thread collects results in order
and gives back each finished tensor's pages while the threads work on. Partial
sums are added in part order, so results do not depend on timing. Memory stays
near one tensor's views plus a few blocks per thread.
"""

from __future__ import annotations

import collections
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ... import errors
from ...format.dtypes import DTYPES
from ...format.integrity import hash_bytes
from ...sources.base import TensorInfo, TensorSource
from .sums import Sums, Tolerance, bits_equal, part_sums
from ..selection import choose_tensors, matches, name_globs, tied_names

__all__ = ["DiffEntry", "DiffReport", "diff", "STATUSES"]

STATUSES = ("equal", "changed", "dtype", "shape", "renamed", "only_a", "only_b")
# Statuses that make two checkpoints differ structurally (whatever the tolerance).
STRUCTURAL = frozenset({"dtype", "shape", "renamed", "only_a", "only_b"})

# Elements of one piece of work handed to a thread: tensors are cut into parts this long (a
# smaller tensor is one part), so the threads share large tensors and take small ones in turn.
PART_ELEMENTS = 4 * 1024 * 1024
# Tensors queued ahead of the one being finished: the threads never wait for each other.
TENSORS_IN_FLIGHT = 4
# Threads used when `threads` is not given.
MAX_THREADS = 8


# --- the report ---------------------------------------------------------------------

@dataclass
class DiffEntry:
    """How one tensor name compares (see the module docstring for each field)."""

    name: str
    status: str
    dtype_a: Optional[str] = None
    dtype_b: Optional[str] = None
    shape_a: Optional[tuple[int, ...]] = None
    shape_b: Optional[tuple[int, ...]] = None
    numel: int = 0
    max_abs: Optional[float] = None
    mean_abs: Optional[float] = None
    rel_l2: Optional[float] = None
    cosine: Optional[float] = None
    changed_elements: Optional[int] = None
    nonfinite_mismatch: Optional[int] = None
    within_tolerance: Optional[bool] = None
    beyond_tolerance: Optional[int] = None
    renamed_to: Optional[str] = None
    note: Optional[str] = None

    def to_dict(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, float) and not math.isfinite(value):
                value = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            out[key] = value
        return out


@dataclass
class DiffReport:
    """The comparison of checkpoint `a` (the reference) with `b`.

    >>> report = diff("base.safetensors", "finetuned.safetensors")
    >>> report.identical, report.summary["changed"]
    (False, 290)
    """

    a: str
    b: str
    format_a: str
    format_b: str
    entries: list[DiffEntry]
    atol: Optional[float] = None
    rtol: Optional[float] = None
    strict_dtype: bool = False
    bytes_compared: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, int]:
        """Entries per status (every status, zeros included)."""
        counts = dict.fromkeys(STATUSES, 0)
        for entry in self.entries:
            counts[entry.status] += 1
        return counts

    @property
    def identical(self) -> bool:
        """Every name on both sides, with bit-identical tensors."""
        return all(entry.status == "equal" for entry in self.entries)

    @property
    def tolerance(self) -> bool:
        """True when a tolerance was given."""
        return self.atol is not None or self.rtol is not None

    @property
    def within_tolerance(self) -> bool:
        """The gate: no structural difference, every compared tensor within tolerance (bit-identical
        when no tolerance was given); a dtype change passes on its values unless `strict_dtype`."""
        return all(self._passes(entry) for entry in self.entries)

    def _passes(self, entry: DiffEntry) -> bool:
        if entry.status == "dtype" and not self.strict_dtype:
            if self.tolerance:
                return bool(entry.within_tolerance)
            return entry.changed_elements == 0 and not entry.nonfinite_mismatch
        if not self.tolerance:
            return entry.status == "equal"
        return entry.status not in STRUCTURAL and bool(entry.within_tolerance)

    @property
    def differences(self) -> list[DiffEntry]:
        """Entries that are not ``equal``."""
        return [entry for entry in self.entries if entry.status != "equal"]

    def to_dict(self) -> dict:
        """JSON-able; non-finite floats become "inf", "-inf", "nan"."""
        return {"a": self.a, "b": self.b, "format_a": self.format_a, "format_b": self.format_b,
                "identical": self.identical, "within_tolerance": self.within_tolerance,
                "atol": self.atol, "rtol": self.rtol, "strict_dtype": self.strict_dtype, "summary": self.summary,
                "bytes_compared": self.bytes_compared, "seconds": self.seconds, "notes": list(self.notes),
                "entries": [entry.to_dict() for entry in self.entries]}


# --- public API -----------------------------------------------------------------------

def diff(a: "os.PathLike | str | TensorSource", b: "os.PathLike | str | TensorSource", *,
         atol: Optional[float] = None, rtol: Optional[float] = None, extract: Optional[str] = "auto",
         select: "Sequence[str] | str | None" = None, exclude: "Sequence[str] | str | None" = None,
         progress: Optional[Callable[[int, int, str], None]] = None,
         threads: Optional[int] = None, strict_dtype: bool = False) -> DiffReport:
    """Compare checkpoint `b` with the reference `a`, tensor by tensor (any formats).

    `atol` / `rtol` set the tolerance gate (|a-b| > atol + rtol*|a| fails); a
    tensor whose dtype changed is judged by its values, or fails the gate
    whatever its values with `strict_dtype`;
    `extract` is "auto", a top-level key or None, applied to both sides as
    `convert` applies it; `select` / `exclude` are globs on those names (both sides);
    `progress(done_bytes, total_bytes, name)` is called
    after each tensor; `threads` defaults to the cores (at most `MAX_THREADS`).

    >>> report = diff("model.ckpt", "model.safetensors")
    >>> report.identical
    True
    >>> diff("fp32.safetensors", "bf16.safetensors", rtol=1e-2).entries[0].rel_l2
    0.0021
    """
    started = time.perf_counter()
    tolerance = Tolerance.of(atol, rtol)
    threads = _thread_count(threads)
    globs = (name_globs(select, "select"), name_globs(exclude, "exclude"))
    with _Side.open(a, extract, "A", globs) as side_a, _Side.open(b, extract, "B", globs) as side_b:
        plan = _Plan.make(side_a, side_b)
        renames = _Renames(side_a, side_b, plan)
        total = plan.bytes_to_compare + renames.bytes_to_hash
        done = 0
        entries: dict[str, DiffEntry] = {}
        with _Comparer(tolerance, threads) as comparer:
            first_of: dict[tuple[str, str], str] = {}  # a tie on both sides is compared once
            ties: dict[str, str] = {}
            in_flight: collections.deque = collections.deque()

            def finish_one() -> None:
                nonlocal done
                name, pending, source_names = in_flight.popleft()
                entries[name] = comparer.finish(pending)
                _release(side_a.source, source_names[0], side_b.source, source_names[1])
                done += pending.nbytes
                if progress is not None:
                    progress(done, total, name)

            for name in plan.compared:
                key = (side_a.canonical[name], side_b.canonical[name])
                if key in first_of:
                    ties[name] = first_of[key]
                    continue
                first_of[key] = name
                src_a, src_b = side_a.names[name], side_b.names[name]
                info_a, info_b = side_a.source.infos[src_a], side_b.source.infos[src_b]
                pending = comparer.submit(name, side_a.source.read(src_a), side_b.source.read(src_b),
                                          info_a, info_b)
                in_flight.append((name, pending, (src_a, src_b)))
                while len(in_flight) > TENSORS_IN_FLIGHT:
                    finish_one()
            while in_flight:
                finish_one()
            for name, first in ties.items():
                entries[name] = _copy_as(entries[first], name)
        for name in plan.structural:
            entries[name] = plan.structural[name]
        renamed = renames.find(lambda n, name: progress(done + n, total, name) if progress else None)
        entries.update(renamed)
        ordered = [entries[name] for name in side_a.names if name in entries]
        ordered += [entries[name] for name in side_b.names if name not in side_a.names and name in entries]
        return DiffReport(
            a=side_a.source.path, b=side_b.source.path, format_a=side_a.source.format,
            format_b=side_b.source.format, entries=ordered, atol=atol if tolerance.given else None,
            rtol=rtol if tolerance.given else None, strict_dtype=strict_dtype, bytes_compared=total,
            seconds=time.perf_counter() - started, notes=side_a.notes + side_b.notes)


# --- the two sides and what to compare -------------------------------------------------

class _Side:
    """One checkpoint: output name -> source name, and a key shared by tied names."""

    def __init__(self, source: TensorSource, owned: bool, extract: Optional[str], label: str,
                 globs: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> None:
        self.source = source
        self.owned = owned
        choice = choose_tensors(source, extract=extract)
        self.names: dict[str, str] = dict(choice.names)
        tied = tied_names(source, choice)
        self.canonical = {out: self.names[tied.get(out, out)] for out in self.names}
        for dropped, kept in (source.metadata or {}).items():
            if dropped not in self.names and kept in self.names:  # save_model's record of a tie
                self.names[dropped] = self.names[kept]
                self.canonical[dropped] = self.canonical[kept]
        if any(globs):
            self.names = {out: name for out, name in self.names.items() if matches(out, *globs)}
        self.notes = [f"{label}: {note}" for note in choice.notes]

    @classmethod
    def open(cls, path_or_source: Any, extract: Optional[str], label: str,
             globs: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> "_Side":
        if isinstance(path_or_source, TensorSource):
            return cls(path_or_source, False, extract, label, globs)
        from ...sources import open_source  # the sources package imports ops modules

        source = open_source(os.fspath(path_or_source))
        try:
            return cls(source, True, extract, label, globs)
        except BaseException:
            source.close()
            raise

    def info(self, name: str) -> TensorInfo:
        return self.source.infos[self.names[name]]

    def __enter__(self) -> "_Side":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.source.close()


@dataclass
class _Plan:
    compared: list[str]  # names whose values are compared (same shape)
    structural: dict[str, DiffEntry]  # shape changes
    only_a: list[str]
    only_b: list[str]
    bytes_to_compare: int

    @classmethod
    def make(cls, a: _Side, b: _Side) -> "_Plan":
        compared, structural, total, seen = [], {}, 0, set()
        for name in a.names:
            if name not in b.names:
                continue
            info_a, info_b = a.info(name), b.info(name)
            if tuple(info_a.shape) != tuple(info_b.shape):
                structural[name] = _entry(name, "shape", info_a, info_b)
                continue
            compared.append(name)
            key = (a.canonical[name], b.canonical[name])
            if key not in seen:
                seen.add(key)
                total += info_a.nbytes + info_b.nbytes
        only_a = [name for name in a.names if name not in b.names]
        only_b = [name for name in b.names if name not in a.names]
        return cls(compared, structural, only_a, only_b, total)


def _entry(name: str, status: str, info_a: Optional[TensorInfo], info_b: Optional[TensorInfo]) -> DiffEntry:
    return DiffEntry(name=name, status=status,
                     dtype_a=info_a.dtype if info_a else None, dtype_b=info_b.dtype if info_b else None,
                     shape_a=tuple(info_a.shape) if info_a else None,
                     shape_b=tuple(info_b.shape) if info_b else None,
                     numel=(info_a or info_b).numel)


def _copy_as(entry: DiffEntry, name: str) -> DiffEntry:
    copy = DiffEntry(**entry.__dict__)
    copy.name = name
    return copy


class _Renames:
    """Names only in A and only in B holding the same bytes (same dtype and shape)."""

    def __init__(self, a: _Side, b: _Side, plan: _Plan) -> None:
        self.a, self.b, self.plan = a, b, plan
        kinds_b = {self._kind(b, name) for name in plan.only_b}
        kinds_a = {self._kind(a, name) for name in plan.only_a}
        self.candidates_a = [n for n in plan.only_a if self._kind(a, n) in kinds_b]
        self.candidates_b = [n for n in plan.only_b if self._kind(b, n) in kinds_a]
        self.bytes_to_hash = sum(info.nbytes for side, names in ((a, self.candidates_a), (b, self.candidates_b))
                                 for info in {side.canonical[n]: side.info(n) for n in names}.values())

    @staticmethod
    def _kind(side: _Side, name: str) -> tuple:
        info = side.info(name)
        return info.dtype, tuple(info.shape)

    def find(self, progress: Callable[[int, str], None]) -> dict[str, DiffEntry]:
        done = 0
        hashes: dict[tuple[int, str], str] = {}

        def digest(side: _Side, name: str) -> tuple:
            nonlocal done
            key = (id(side), side.canonical[name])
            if key not in hashes:
                source_name = side.names[name]
                try:
                    hashes[key] = hash_bytes(_canonical_bytes(side.source.read(source_name)))
                finally:
                    side.source.release(source_name)
                done += side.info(name).nbytes
                progress(done, name)
            return (*self._kind(side, name), hashes[key])

        waiting: dict[tuple, list[str]] = {}
        for name in self.candidates_b:
            waiting.setdefault(digest(self.b, name), []).append(name)
        entries: dict[str, DiffEntry] = {}
        for name in self.candidates_a:
            partners = waiting.get(digest(self.a, name))
            if partners:
                other = partners.pop(0)
                entry = _entry(name, "renamed", self.a.info(name), self.b.info(other))
                entry.renamed_to = other
                entries[name] = entry
        paired = {entry.renamed_to for entry in entries.values()}
        for name in self.plan.only_a:
            if name not in entries:
                entries[name] = _entry(name, "only_a", self.a.info(name), None)
        for name in self.plan.only_b:
            if name not in paired:
                entries[name] = _entry(name, "only_b", None, self.b.info(name))
        return entries


def _canonical_bytes(array: np.ndarray) -> np.ndarray:
    """The tensor's bytes as safetensors stores them (C order, little-endian), as uint8."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8)


# --- comparing values ----------------------------------------------------------------

@dataclass
class _Pending:
    """A tensor pair whose parts are queued: each part's (bytes equal, sums) or its future."""

    entry: DiffEntry
    x: np.ndarray
    y: np.ndarray
    parts: list[slice]
    found: list
    numeric: bool
    nbytes: int


class _Comparer:
    """Compares tensor pairs block by block on a pool of threads.

    `submit` cuts a pair into parts and queues them; `finish` waits for them and
    gives the entry. Several tensors are queued at once, so the threads never wait
    for each other at the end of a tensor.
    """

    def __init__(self, tolerance: Tolerance, threads: int) -> None:
        self.tolerance = tolerance
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="safeckpt-diff") if threads > 1 else None

    def __enter__(self) -> "_Comparer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def submit(self, name: str, a: np.ndarray, b: np.ndarray, info_a: TensorInfo,
               info_b: TensorInfo) -> "_Pending":
        same_dtype = info_a.dtype == info_b.dtype
        entry = _entry(name, "changed" if same_dtype else "dtype", info_a, info_b)
        x, y = _flat(a), _flat(b)
        numeric = DTYPES[info_a.dtype].numpy is not None and DTYPES[info_b.dtype].numpy is not None
        parts = self._parts(x.size)
        bytes_first = same_dtype
        if not same_dtype and not numeric:
            parts = []  # nothing to compare: bytes differ in meaning, no numbers to compute
        found = [self._run(self._part, x[r], y[r], bytes_first=bytes_first, numeric=numeric) for r in parts]
        return _Pending(entry, x, y, parts, found, numeric, info_a.nbytes + info_b.nbytes)

    def finish(self, pending: "_Pending") -> DiffEntry:
        entry, x, y = pending.entry, pending.x, pending.y
        found = [f.result() if isinstance(f, Future) else f for f in pending.found]
        if entry.status == "changed":
            if all(equal for equal, _ in found):
                return self._equal(entry)
            if pending.numeric:  # parts found equal have no sums yet
                found = [(equal, sums) if sums is not None else
                         self._part(x[r], y[r], bytes_first=False, numeric=True)
                         for r, (equal, sums) in zip(pending.parts, found)]
        if not pending.numeric:
            entry.note = "no numpy type for this dtype: compared as bytes only"
            if self.tolerance.given:
                entry.within_tolerance = False
            return entry
        total = Sums()
        for _, sums in found:
            total.add(sums)
        return self._stats(entry, total)

    def _run(self, work: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.pool is None:
            return work(*args, **kwargs)
        return self.pool.submit(work, *args, **kwargs)

    def _equal(self, entry: DiffEntry) -> DiffEntry:
        entry.status = "equal"
        entry.max_abs = entry.mean_abs = entry.rel_l2 = 0.0
        entry.cosine = 1.0
        entry.changed_elements = entry.nonfinite_mismatch = 0
        if self.tolerance.given:
            entry.within_tolerance, entry.beyond_tolerance = True, 0
        return entry

    def _stats(self, entry: DiffEntry, s: Sums) -> DiffEntry:
        if s.finite:
            entry.max_abs = s.abs_max
            entry.mean_abs = s.abs_sum / s.finite
            norm_a, norm_b, norm_d = math.sqrt(s.aa), math.sqrt(s.bb), math.sqrt(s.dd)
            entry.rel_l2 = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
            if norm_a > 0 and norm_b > 0:
                entry.cosine = min(1.0, max(-1.0, s.ab / norm_a / norm_b))
        entry.changed_elements = s.changed + s.nonfinite
        entry.nonfinite_mismatch = s.nonfinite
        if self.tolerance.given:
            entry.beyond_tolerance = s.beyond + s.nonfinite
            entry.within_tolerance = entry.beyond_tolerance == 0
        return entry

    # -- splitting the work
    def _parts(self, n: int) -> list[slice]:
        """Contiguous ranges of at most `PART_ELEMENTS`: small tensors are one part, large ones
        are shared by the threads."""
        per = PART_ELEMENTS
        if self.threads > 1 and n > PART_ELEMENTS:  # large: at least a part per thread
            per = min(per, -(-n // self.threads))
        return [slice(start, min(start + per, n)) for start in range(0, max(n, 1), per)]

    # -- one part: bytes first, floats once they differ
    def _part(self, x: np.ndarray, y: np.ndarray, *, bytes_first: bool,
              numeric: bool) -> tuple[bool, Optional[Sums]]:
        if bytes_first:
            if bits_equal(x, y):
                return True, None
            if not numeric:
                return False, None
        return False, part_sums(x, y, self.tolerance)


def _release(source_a: TensorSource, name_a: str, source_b: TensorSource, name_b: str) -> None:
    source_a.release(name_a)
    source_b.release(name_b)


def _flat(array: np.ndarray) -> np.ndarray:
    """The values in C order as a 1-D array (a view unless the source array is strided)."""
    return np.ascontiguousarray(array).reshape(-1)


def _thread_count(threads: Optional[int]) -> int:
    if threads is None:
        return max(1, min(os.cpu_count() or 1, MAX_THREADS))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise errors.SafeckptError(f"threads must be a positive integer, not {threads!r}")
    return threads
