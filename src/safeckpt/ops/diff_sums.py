"""The sums behind diff: one contiguous part of a tensor pair, in float64.

`part_sums(x, y, tolerance)` returns a `Sums` over two 1-D arrays of the same
length (any real or complex numpy dtype, bf16 and fp8 from ml_dtypes): over the
pairs where both values are finite, their count, sum a*a, b*b, a*b, d*d
(d = a-b), sum and max |d|, pairs with d != 0 and pairs beyond the tolerance;
and the non-finite pairs that do not match (a match is two NaNs or the same
infinity). `ops.diff` turns these into max_abs, mean_abs, rel_l2 and cosine.

Two implementations, same results to the rounding of the sums:

- the fused loop of the compiled extension `_diffstats` (`_diffstats.c`, built
  when safeckpt is installed where a C compiler is): one pass over both
  tensors, reading f64, f32, f16 and bf16 straight from the file's pages
  (other dtypes are widened to float64 a block at a time first). It is what
  makes diff I/O-bound rather than CPU-bound.
- numpy, where the extension is not built (and for complex values): each block
  of `BLOCK_ELEMENTS` is widened to float64 once per side (fp16 and 8-bit
  floats through a table of every bit pattern) and reduced in about nine numpy
  passes. Dot products go through BLAS in rows of `DOT_PIECE` elements, short
  enough that BLAS does not start threads of its own (they fight the diff's
  threads for the cores) and many enough that numpy lets go of the GIL. Three
  per block: ||a||^2 and ||b||^2 (one call for both) and ||a-b||^2; a.b is then
  (||a||^2 + ||b||^2 - ||a-b||^2) / 2, whose error is a few ulps of
  ||a||^2 + ||b||^2: about 1e-16 * (||a||/||b|| + ||b||/||a||) absolute on the
  cosine, negligible unless one norm is orders of magnitude below the other.

Both release the GIL for the work, so diff runs parts on every core.
"""

from __future__ import annotations

import math
import numbers
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import errors

try:
    from . import _diffstats as kernel
except ImportError:  # built without a C compiler: numpy does the same work
    kernel = None

__all__ = ["Sums", "Tolerance", "part_sums", "bits_equal", "BLOCK_ELEMENTS", "DOT_PIECE"]

# Elements widened to float64 at a time by one thread: its two float64 buffers stay in the
# caches, and the dozen numpy calls per block cost little next to the work (measured: 64K to
# 1M elements are within 20%, 256K the fastest).
BLOCK_ELEMENTS = 256 * 1024
# Length of the rows handed to BLAS for dot products (np.vecdot over a block cut into rows).
# Short rows for two reasons: OpenBLAS starts threads of its own for a dot of more than
# 10,000 elements, and with diff's already on every core the two pools fighting made a diff
# 10-30x slower; and numpy releases the GIL around a vecdot only for more than 500 rows
# (with 8192-element rows the threads took turns). 256 costs 5% more than 8192 on one thread.
DOT_PIECE = 256

_vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0
# The kernel reads these straight from memory, in this machine's byte order.
_KERNEL_KINDS = {"float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}


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
        for key in ("finite", "aa", "bb", "ab", "dd", "abs_sum", "changed", "nonfinite", "beyond"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.abs_max = max(self.abs_max, other.abs_max)


def part_sums(x: np.ndarray, y: np.ndarray, tolerance: Tolerance) -> Sums:
    """The sums over two 1-D arrays of the same length (see the module docstring)."""
    complex_pairs = x.dtype.kind == "c" or y.dtype.kind == "c"
    if kernel is None or complex_pairs:
        return _numpy_sums(x, y, tolerance)
    limits = (tolerance.atol, tolerance.rtol) if tolerance.given else None
    kind_x, kind_y = _kernel_kind(x), _kernel_kind(y)
    if kind_x and kind_y:  # read in place: one pass over the file's pages
        return Sums(*kernel.block_sums(_bits(x), kind_x, _bits(y), kind_y, limits))
    sums = Sums()
    buffers = _buffers()
    for start in range(0, x.size, BLOCK_ELEMENTS):
        xs, ys = x[start:start + BLOCK_ELEMENTS], y[start:start + BLOCK_ELEMENTS]
        a, b = (xs, kind_x) if kind_x else (_to_float64(xs, buffers.rows[0, :xs.size]), "f64")
        c, d = (ys, kind_y) if kind_y else (_to_float64(ys, buffers.rows[1, :ys.size]), "f64")
        sums.add(Sums(*kernel.block_sums(_bits(a), b, _bits(c), d, limits)))
    return sums


def bits_equal(x: np.ndarray, y: np.ndarray) -> bool:
    """Bit-identical values (byte order aside), compared a block at a time."""
    flags = _buffers().flags
    for start in range(0, x.size, BLOCK_ELEMENTS):
        xs, ys = x[start:start + BLOCK_ELEMENTS], y[start:start + BLOCK_ELEMENTS]
        if xs.dtype == ys.dtype and (xs.nbytes % 8 == 0):  # widest compare, same byte order
            bx, by = xs.view(np.uint8).view(np.uint64), ys.view(np.uint8).view(np.uint64)
        else:
            bx, by = _bits(xs), _bits(ys)
        if not np.equal(bx, by, out=flags[:bx.size]).all():
            return False
    return True


def _kernel_kind(x: np.ndarray) -> Optional[str]:
    native = x.dtype.byteorder in "=|" or (x.dtype.byteorder == "<") == (sys.byteorder == "little")
    return _KERNEL_KINDS.get(x.dtype.name) if native else None


# --- the numpy path ----------------------------------------------------------------------

class _Buffers:
    """One thread's scratch space: float64 copies of A and of B (then A-B), flags, moduli."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows = np.empty((2, 2 * size))  # A and B: two floats per complex value
        self.m = np.empty(size)
        self.flags = np.empty(2 * size, dtype=bool)


_local = threading.local()


def _buffers() -> _Buffers:
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers.size != BLOCK_ELEMENTS:
        buffers = _local.buffers = _Buffers(BLOCK_ELEMENTS)
    return buffers


def _numpy_sums(x: np.ndarray, y: np.ndarray, tolerance: Tolerance) -> Sums:
    sums = Sums()
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the careful path handles it
        for start in range(0, x.size, BLOCK_ELEMENTS):
            _block(x[start:start + BLOCK_ELEMENTS], y[start:start + BLOCK_ELEMENTS], tolerance, sums)
    return sums


def _block(x: np.ndarray, y: np.ndarray, tolerance: Tolerance, sums: Sums) -> None:
    pairs = x.dtype.kind == "c" or y.dtype.kind == "c"
    xr, yr = _real_view(x, pairs), _real_view(y, pairs)
    rows = _buffers().rows[:, :xr.size]  # A in row 0, B (then A-B) in row 1
    a, d = rows[0], rows[1]
    _to_float64(xr, a)
    _to_float64(yr, d)
    aa, bb = _squares(rows)
    np.subtract(a, d, out=d)
    dd = _dot(d, d)
    ab = (aa + bb - dd) / 2  # one pass fewer (see the module docstring on its accuracy)
    if not math.isfinite(aa + bb + dd):  # a NaN or inf somewhere: the careful path
        _to_float64(yr, d)
        _nonfinite_block(a, d, pairs, tolerance, sums)
        return
    sums.add(_finite_sums(a, d, pairs, tolerance, aa, bb, ab, dd, x.size))


def _finite_sums(a: np.ndarray, d: np.ndarray, pairs: bool, tolerance: Tolerance, aa: float, bb: float,
                 ab: float, dd: float, n: int) -> Sums:
    """Sums over finite pairs; `d` holds a - b (both are overwritten)."""
    buffers = _buffers()
    if pairs:
        magnitude = np.hypot(d[0::2], d[1::2], out=buffers.m[:n])
    else:
        magnitude = np.abs(d, out=d)
    top = float(magnitude.max()) if n else 0.0
    sums = Sums(n, aa, bb, ab, dd, float(magnitude.sum()), top,
                _count_nonzero(magnitude, buffers.flags[:magnitude.size]))
    if tolerance.given and top > tolerance.atol:
        flags = buffers.flags[:n]
        if tolerance.rtol == 0:
            np.greater(magnitude, tolerance.atol, out=flags)
        else:
            limit = np.hypot(a[0::2], a[1::2]) if pairs else np.abs(a, out=a)
            limit *= tolerance.rtol
            limit += tolerance.atol
            np.greater(magnitude, limit, out=flags)
        sums.beyond = int(np.count_nonzero(flags))
    return sums


def _nonfinite_block(a: np.ndarray, b: np.ndarray, pairs: bool, tolerance: Tolerance, sums: Sums) -> None:
    """A block with NaN or inf (rare): stats over the finite pairs, the rest counted."""
    a2, b2 = (a.reshape(-1, 2), b.reshape(-1, 2)) if pairs else (a.reshape(-1, 1), b.reshape(-1, 1))
    both = np.isfinite(a2).all(axis=1) & np.isfinite(b2).all(axis=1)
    same = ((np.isnan(a2) & np.isnan(b2)) | (a2 == b2)).all(axis=1)
    mismatched = int(np.count_nonzero(~both & ~same))
    fa, fb = a2[both].reshape(-1), b2[both].reshape(-1)
    aa, bb, ab = _dot(fa, fa), _dot(fb, fb), _dot(fa, fb)
    fd = np.subtract(fa, fb)
    part = _finite_sums(fa, fd, pairs, tolerance, aa, bb, ab, _dot(fd, fd), int(np.count_nonzero(both)))
    part.nonfinite = mismatched
    sums.add(part)


def _real_view(x: np.ndarray, pairs: bool) -> np.ndarray:
    """Complex values as their (real, imag) floats; a real side of a complex pair gets imag 0."""
    if not pairs:
        return x
    if x.dtype.kind != "c":
        x = x.astype(np.complex128)
    return x.view(np.dtype(f"{x.dtype.byteorder}f{x.dtype.itemsize // 2}"))


def _to_float64(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`values` as float64 into `out` (returned); fp16 and 8-bit floats through a table of every
    bit pattern (numpy and ml_dtypes convert those one value at a time: 4x slower for fp8, 1.6x
    for fp16)."""
    table = _float64_table(values.dtype)
    if table is None:
        np.copyto(out, values, casting="unsafe")
    else:  # "wrap": no bounds checks, and every bit pattern is in the table
        np.take(table, _bits(values), out=out, mode="wrap")
    return out


_TABLES: dict[np.dtype, Optional[np.ndarray]] = {}


def _float64_table(dtype: np.dtype) -> Optional[np.ndarray]:
    if dtype not in _TABLES:
        table = None
        if dtype.itemsize <= 2 and dtype.kind not in "biuc" and dtype.name != "bfloat16":  # bf16 casts fast
            patterns = np.arange(1 << (8 * dtype.itemsize), dtype=np.uint32)
            table = patterns.astype(_bits(np.empty(0, dtype)).dtype).view(dtype).astype(np.float64)
        _TABLES[dtype] = table
    return _TABLES[dtype]


def _bits(x: np.ndarray) -> np.ndarray:
    """The values as unsigned integers of their (component) width, in their own byte order."""
    width = x.dtype.itemsize // 2 if x.dtype.kind == "c" else x.dtype.itemsize
    order = x.dtype.byteorder if x.dtype.byteorder in "<>" else "="
    return x.view(np.uint8).view(np.dtype(f"{order}u{width}"))


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """x . y in float64, through BLAS in rows of `DOT_PIECE` (see the module docstring)."""
    n = x.size
    if n <= DOT_PIECE:
        return float(np.dot(x, y))
    whole = n - n % DOT_PIECE
    if _vecdot is not None:
        total = float(_vecdot(x[:whole].reshape(-1, DOT_PIECE), y[:whole].reshape(-1, DOT_PIECE)).sum())
    else:
        total = math.fsum(float(np.dot(x[i:i + DOT_PIECE], y[i:i + DOT_PIECE]))
                          for i in range(0, whole, DOT_PIECE))
    return total + float(np.dot(x[whole:], y[whole:])) if whole < n else total


def _squares(rows: np.ndarray) -> tuple[float, float]:
    """The squared norms of both rows of a (2, n) array, in one BLAS call (see `_dot`)."""
    n = rows.shape[1]
    whole = n - n % DOT_PIECE
    if _vecdot is None or whole == 0:
        return _dot(rows[0], rows[0]), _dot(rows[1], rows[1])
    pieces = rows[:, :whole].reshape(2, -1, DOT_PIECE)
    totals = _vecdot(pieces, pieces).sum(axis=1)
    if whole < n:
        totals += np.einsum("ij,ij->i", rows[:, whole:], rows[:, whole:])
    return float(totals[0]), float(totals[1])


def _count_nonzero(values: np.ndarray, flags: np.ndarray) -> int:
    """Non-zero entries of `values`, through a bool buffer: comparing, then counting bools, is
    twice as fast as counting the floats (or their bits) directly."""
    return int(np.count_nonzero(np.not_equal(values, 0, out=flags)))
