"""The sums behind diff: one contiguous part of a tensor pair, in float64.

`part_sums(x, y, tolerance)` returns a `Sums` over two 1-D arrays of the same
length (any real or complex numpy dtype, bf16 and fp8 from ml_dtypes): over the
pairs where both values are finite, their count, sum a*a, b*b, a*b, d*d
(d = a-b), sum and max |d|, pairs with d != 0 and pairs beyond the tolerance;
and the non-finite pairs that do not match (a match is two NaNs or the same
infinity). `ops.diff` turns these into max_abs, mean_abs, rel_l2 and cosine.

How, with numpy alone: a part is cut into blocks of `BLOCK_ELEMENTS` floats,
each widened to float64 once per side into one thread's scratch rows (bf16 by
shifting its bits into the top half of a float32, 8-bit floats through a table
of every bit pattern, the rest by numpy's casts), then reduced in place with
nothing allocated: ||a||^2 and ||b||^2, a-b (over b), ||a-b||^2, then |a-b| and
its max, sum and non-zeros. a.b is (||a||^2 + ||b||^2 - ||a-b||^2) / 2, whose
error is a few ulps of ||a||^2 + ||b||^2: about
1e-16 * (||a||/||b|| + ||b||/||a||) absolute on the cosine, negligible unless
one norm is orders of magnitude below the other. Dot products go through BLAS,
in rows of `DOT_PIECE` elements.

On a full block every numpy call lets go of the GIL for its work, so diff runs
parts on every core.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ... import errors

__all__ = ["Sums", "Tolerance", "part_sums", "bits_equal", "BLOCK_ELEMENTS", "DOT_PIECE"]

# Floats widened to float64 at a time by one thread (a complex value is two: keep it even). Not
# sized for L2: numpy's loops run as fast from L3 (measured: 0.16 ns per element for |d| in a
# 128 KiB block, 0.14 in 2 MiB), while each call costs microseconds, so 32K-element blocks made
# a diff 40% slower than these 2 MiB rows.
BLOCK_ELEMENTS = 256 * 1024
# Length of the rows handed to BLAS for dot products (np.matmul over a block cut into rows).
# Short rows for two reasons: OpenBLAS starts threads of its own for a dot of more than
# 10,000 elements, and with diff's already on every core the two pools fighting made a diff
# 10-30x slower; and numpy lets go of the GIL around a stack of dots only for more than 500
# of them (with 8192-element rows the threads took turns).
DOT_PIECE = 256


@dataclass(frozen=True)
class Tolerance:
    """The diff gate: an element fails when |a-b| > atol + rtol * |a|."""

    given: bool
    atol: float
    rtol: float

    @classmethod
    def of(cls, atol: Optional[float], rtol: Optional[float]) -> "Tolerance":
        for label, value in (("atol", atol), ("rtol", rtol)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 \
                    or math.isinf(value):
                raise errors.SafeckptError(f"{label} must be a finite number >= 0, not {value!r}")
        return cls(atol is not None or rtol is not None, float(atol or 0.0), float(rtol or 0.0))


@dataclass
class Sums:
    """Partial results over some pairs; `add` merges another part in order."""

    finite: int = 0  # pairs where both values are finite
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    dd: float = 0.0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    changed: int = 0  # finite pairs that differ
    nonfinite: int = 0  # non-finite pairs that do not match
    beyond: int = 0

    def add(self, other: "Sums") -> None:
        self.finite += other.finite
        self.aa += other.aa
        self.bb += other.bb
        self.ab += other.ab
        self.dd += other.dd
        self.abs_sum += other.abs_sum
        self.abs_max = max(self.abs_max, other.abs_max)
        self.changed += other.changed
        self.nonfinite += other.nonfinite
        self.beyond += other.beyond


def part_sums(x: np.ndarray, y: np.ndarray, tolerance: Tolerance) -> Sums:
    """The sums over two 1-D arrays of the same length (see the module docstring).

    >>> part_sums(np.array([1.0, 2.0]), np.array([1.0, 4.0]), Tolerance.of(None, None)).abs_max
    2.0
    """
    pairs = x.dtype.kind == "c" or y.dtype.kind == "c"
    xr, yr = _real_view(x, pairs), _real_view(y, pairs)
    scratch = _scratch()
    sums = Sums()
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the careful path handles it
        for start in range(0, xr.size, BLOCK_ELEMENTS):
            stop = start + BLOCK_ELEMENTS
            sums.add(_block(xr[start:stop], yr[start:stop], pairs, tolerance, scratch))
    return sums


def bits_equal(x: np.ndarray, y: np.ndarray) -> bool:
    """Bit-identical values (byte order aside), compared a block at a time."""
    flags = _scratch().flags
    for start in range(0, x.size, BLOCK_ELEMENTS):
        xs, ys = x[start:start + BLOCK_ELEMENTS], y[start:start + BLOCK_ELEMENTS]
        if xs.dtype == ys.dtype and (xs.nbytes % 8 == 0):  # widest compare, same byte order
            bx, by = xs.view(np.uint8).view(np.uint64), ys.view(np.uint8).view(np.uint64)
        else:
            bx, by = _bits(xs), _bits(ys)
        if not np.equal(bx, by, out=flags[:bx.size]).all():
            return False
    return True


class _Scratch:
    """One thread's buffers, reused for every block: A and B (then A-B) as float64, the
    float32s that bf16 widens through, complex moduli and flags."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows = np.empty((2, size))
        self.bf16 = np.empty(size, dtype=np.uint32)
        self.m = np.empty(size // 2)
        self.flags = np.empty(2 * size, dtype=bool)  # bits_equal: a complex value is two integers


_local = threading.local()


def _scratch() -> _Scratch:
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.size != BLOCK_ELEMENTS:
        scratch = _local.scratch = _Scratch(BLOCK_ELEMENTS)
    return scratch


def _block(x: np.ndarray, y: np.ndarray, pairs: bool, tolerance: Tolerance, scratch: _Scratch) -> Sums:
    a, d = scratch.rows[0, :x.size], scratch.rows[1, :x.size]  # d holds B, then A-B
    _to_float64(x, a, scratch)
    _to_float64(y, d, scratch)
    aa, bb = _dot(a, a), _dot(d, d)
    np.subtract(a, d, out=d)
    dd = _dot(d, d)
    if not math.isfinite(aa + bb + dd):  # a NaN or inf somewhere: the careful path
        _to_float64(y, d, scratch)
        return _nonfinite_block(a, d, pairs, tolerance, scratch)
    ab = (aa + bb - dd) / 2  # one pass fewer (see the module docstring on its accuracy)
    return _finite_sums(a, d, pairs, tolerance, aa, bb, ab, dd, scratch)


def _finite_sums(a: np.ndarray, d: np.ndarray, pairs: bool, tolerance: Tolerance, aa: float, bb: float,
                 ab: float, dd: float, scratch: _Scratch) -> Sums:
    """Sums over finite pairs; `d` holds a - b (both are overwritten)."""
    if pairs:
        magnitude = np.hypot(d[0::2], d[1::2], out=scratch.m[:d.size // 2])
    else:
        magnitude = np.abs(d, out=d)
    n = magnitude.size
    top = float(magnitude.max()) if n else 0.0
    # comparing, then counting bools, is twice as fast as counting the floats directly
    changed = int(np.count_nonzero(np.not_equal(magnitude, 0, out=scratch.flags[:n])))
    sums = Sums(n, aa, bb, ab, dd, float(magnitude.sum()), top, changed)
    if tolerance.given and top > tolerance.atol:
        flags = scratch.flags[:n]
        if tolerance.rtol == 0:
            np.greater(magnitude, tolerance.atol, out=flags)
        else:
            limit = np.hypot(a[0::2], a[1::2]) if pairs else np.abs(a, out=a)
            limit *= tolerance.rtol
            limit += tolerance.atol
            np.greater(magnitude, limit, out=flags)
        sums.beyond = int(np.count_nonzero(flags))
    return sums


def _nonfinite_block(a: np.ndarray, b: np.ndarray, pairs: bool, tolerance: Tolerance,
                     scratch: _Scratch) -> Sums:
    """A block with NaN or inf (rare): stats over the finite pairs, the rest counted."""
    a2, b2 = (a.reshape(-1, 2), b.reshape(-1, 2)) if pairs else (a.reshape(-1, 1), b.reshape(-1, 1))
    both = np.isfinite(a2).all(axis=1) & np.isfinite(b2).all(axis=1)
    same = ((np.isnan(a2) & np.isnan(b2)) | (a2 == b2)).all(axis=1)
    mismatched = int(np.count_nonzero(~both & ~same))
    fa, fb = a2[both].reshape(-1), b2[both].reshape(-1)
    aa, bb, ab = _dot(fa, fa), _dot(fb, fb), _dot(fa, fb)
    fd = np.subtract(fa, fb)
    sums = _finite_sums(fa, fd, pairs, tolerance, aa, bb, ab, _dot(fd, fd), scratch)
    sums.nonfinite = mismatched
    return sums


def _real_view(x: np.ndarray, pairs: bool) -> np.ndarray:
    """Complex values as their (real, imag) floats; a real side of a complex pair gets imag 0."""
    if not pairs:
        return x
    if x.dtype.kind != "c":
        x = x.astype(np.complex128)
    return x.view(np.dtype(f"{x.dtype.byteorder}f{x.dtype.itemsize // 2}"))


def _to_float64(values: np.ndarray, out: np.ndarray, scratch: _Scratch) -> None:
    """`values` as float64 into `out`. numpy and ml_dtypes convert bf16 and 8-bit floats one
    value at a time (measured: 1.8x slower for bf16 than its bits as a float32, 2x for fp8
    than a table)."""
    if values.dtype.name == "bfloat16":  # the top half of a float32, in any byte order
        wide = np.left_shift(_bits(values), 16, out=scratch.bf16[:values.size], dtype=np.uint32)
        np.copyto(out, wide.view(np.float32))
        return
    table = _float64_table(values.dtype)
    if table is None:
        np.copyto(out, values, casting="unsafe")
    else:  # "wrap": no bounds checks, and every bit pattern is in the table
        np.take(table, _bits(values), out=out, mode="wrap")


_TABLES: dict[np.dtype, Optional[np.ndarray]] = {}


def _float64_table(dtype: np.dtype) -> Optional[np.ndarray]:
    """Every bit pattern of an 8-bit float as float64 (None for other dtypes)."""
    if dtype not in _TABLES:
        table = None
        if dtype.itemsize == 1 and dtype.kind not in "biu":
            table = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64)
        _TABLES[dtype] = table
    return _TABLES[dtype]


def _bits(x: np.ndarray) -> np.ndarray:
    """The values as unsigned integers of their (component) width, in their own byte order."""
    width = x.dtype.itemsize // 2 if x.dtype.kind == "c" else x.dtype.itemsize
    order = x.dtype.byteorder if x.dtype.byteorder in "<>" else "="
    return x.view(np.uint8).view(np.dtype(f"{order}u{width}"))


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """x . y in float64, through BLAS in rows of `DOT_PIECE` (a stack of 1xk by kx1 products:
    np.vecdot would do, but numpy 1.x lacks it)."""
    n = x.size
    whole = n - n % DOT_PIECE
    rows = np.matmul(x[:whole].reshape(-1, 1, DOT_PIECE), y[:whole].reshape(-1, DOT_PIECE, 1))
    total = float(rows.sum())
    return total + float(np.dot(x[whole:], y[whole:])) if whole < n else total
