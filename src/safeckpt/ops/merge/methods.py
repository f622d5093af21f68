"""The math of `safeckpt merge`: pure functions over numpy arrays.

Every method is computed in an accumulation dtype: float32, or float64 when
any input is float64 (`accumulation_dtype`); inputs of any float dtype (bf16,
fp16, fp8 through ml_dtypes) are widened element by element as they are read.
Each method comes twice:

- a whole-array function (`linear`, `ema`, `slerp`, `task_arithmetic`, `ties`,
  `dare`) -- the readable definition, and what a library user calls on arrays;
- the pieces `ops.merge` streams with: per-tensor coefficients or thresholds
  (`linear_weights`, `ema_weights`, `slerp_weights`, `ties_threshold` /
  `KthLargest`, `tensor_rng`) and per-block kernels (`weighted_sum`, `task_arithmetic_block`,
  `ties_block`, `dare_block`) applied to consecutive 1-D blocks of the
  flattened tensors. Every kernel is elementwise given its coefficients, so a
  blocked merge equals the whole-array one (slerp's dot product is summed per
  block, so it may differ in the last bits).

The methods, with x_i the inputs, b the base model and tau_i = x_i - b:

- linear: sum_i w_i x_i / sum_i w_i (the weighted average, computed so: for equal
  weights exactly numpy's mean in float32). Weights default to uniform; with
  ``normalize=False`` they are used as given, without the division (sums).
- ema over an ordered list with decay d: e_1 = x_1, e_k = d e_(k-1) + (1-d) x_k,
  i.e. a linear merge with weights d^(n-1) for x_1 and (1-d) d^(n-k) for x_k.
- slerp (two inputs, t in [0, 1]), as mergekit computes it: on the flattened
  tensors, cos(omega) = <a, b> / (|a| |b|); result = sin((1-t) omega)/sin(omega) a
  + sin(t omega)/sin(omega) b (the vectors themselves, not their unit
  versions). Nearly parallel or antiparallel tensors (|cos| > `SLERP_DOT_THRESHOLD`)
  and zero tensors fall back to lerp, (1-t) a + t b.
- task arithmetic (Ilharco et al. 2023): b + lambda sum_i w_i tau_i (w_i default 1).
- ties (Yadav et al. 2023): each tau_i is trimmed to its largest-magnitude
  `density` fraction (`ties_threshold`: k = max(1, int(density n)) entries; an
  entry equal to the k-th largest magnitude is kept too, as in the paper's code);
  the sign of each entry is elected by the mass sum_i w_i trim(tau_i) (ties
  towards +, as mergekit); the result is b + lambda times the disjoint weighted
  mean of the trimmed entries that agree with the elected sign:
  sum_i w_i t_i [agree] / sum_i w_i [agree] (0 where none agrees).
- dare (Yu et al. 2024), the linear variant: each entry of tau_i is kept with
  probability `density` and the kept ones are divided by `density`; the result
  is b + lambda sum_i w_i tau'_i. The draws come from `tensor_rng(seed, i, name)`:
  one generator per (seed, input position, tensor name), seeded through a
  SeedSequence from a BLAKE2b hash of the name (never Python's salted hash()),
  drawn in element order -- so the result is the same on every run, whatever
  the block size or the number of threads.

>>> a, b = np.ones(3, np.float32), np.zeros(3, np.float32)
>>> linear([a, b], [3, 1])
array([0.75, 0.75, 0.75], dtype=float32)
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Iterable, Optional, Sequence

import numpy as np

from ... import errors

__all__ = [
    "accumulation_dtype", "linear_weights", "ema_weights", "slerp_weights", "ties_threshold", "KthLargest",
    "tensor_rng",
    "weighted_sum", "task_arithmetic_block", "ties_block", "dare_keep", "dare_block",
    "linear", "ema", "slerp", "task_arithmetic", "ties", "dare", "SLERP_DOT_THRESHOLD", "SLERP_EPSILON",
]

# Slerp falls back to lerp above this |cos(omega)|: sin(omega) is too small to divide
# by accurately (mergekit's DOT_THRESHOLD).
SLERP_DOT_THRESHOLD = 0.9995
# Norms at or below this count as zero (no direction to rotate): lerp.
SLERP_EPSILON = 1e-8


# --- coefficients ------------------------------------------------------------------

def accumulation_dtype(dtypes: Iterable[np.dtype]) -> np.dtype:
    """float64 if any of `dtypes` is float64, else float32.

    >>> accumulation_dtype([np.dtype(np.float16), np.dtype(np.float64)])
    dtype('float64')
    """
    return np.dtype(np.float64) if any(np.dtype(d) == np.float64 for d in dtypes) else np.dtype(np.float32)


def linear_weights(count: int, weights: Optional[Sequence[float]] = None, *, normalize: bool = True) -> np.ndarray:
    """The weights of a linear merge of `count` inputs: uniform by default, summing to 1 if `normalize`.

    >>> linear_weights(2, [3, 1]).tolist(), linear_weights(3).tolist()
    ([0.75, 0.25], [0.3333333333333333, 0.3333333333333333, 0.3333333333333333])
    """
    w = np.full(count, 1.0) if weights is None else _check_weights(weights, count)
    if normalize:
        total = float(w.sum())
        if total == 0.0 or not math.isfinite(total):
            raise errors.SafeckptError(f"the weights {w.tolist()} sum to {total}: they cannot be normalised "
                                       "(give weights with a non-zero sum, or normalize=False)")
        w = w / total
    return w


def ema_weights(count: int, decay: float) -> np.ndarray:
    """The linear weights equal to an EMA over `count` ordered inputs: e_k = d e_(k-1) + (1-d) x_k.

    >>> ema_weights(3, 0.5).tolist()
    [0.25, 0.25, 0.5]
    """
    if count < 1:
        raise errors.SafeckptError("ema needs at least one input")
    _check_unit("decay", decay)
    w = np.array([(1.0 - decay) * decay ** (count - k) for k in range(1, count + 1)])
    w[0] = decay ** (count - 1)
    return w


def slerp_weights(dot: float, norm_a: float, norm_b: float, t: float) -> tuple[float, float]:
    """The coefficients (c_a, c_b) of slerp(a, b, t) = c_a a + c_b b, given <a, b>, |a| and |b|.

    >>> slerp_weights(0.0, 1.0, 1.0, 0.5)  # orthogonal unit vectors: both sin(pi/4)/sin(pi/2)
    (0.7071067811865475, 0.7071067811865475)
    """
    _check_unit("t", t)
    if norm_a <= SLERP_EPSILON or norm_b <= SLERP_EPSILON or not math.isfinite(dot):
        return 1.0 - t, t
    cos = dot / (norm_a * norm_b)
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    sin = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin, math.sin(t * omega) / sin


def ties_threshold(magnitudes: np.ndarray, density: float) -> float:
    """The smallest magnitude TIES keeps: the k-th largest of `magnitudes`, k = max(1, int(density n)).

    >>> ties_threshold(np.array([0.1, 3.0, 0.5, 2.0]), 0.5)
    2.0
    """
    flat = magnitudes.reshape(-1)
    select = KthLargest(flat.dtype, flat.size, density)
    while not select.done:
        select.advance(select.histogram(flat))
    return select.value


class KthLargest:
    """The k-th largest of n non-negative floats seen block by block: TIES' threshold.

    A radix selection on the values' bits (for non-negative IEEE floats the order of
    the bits as unsigned integers is the order of the values): each pass counts the
    next 16 bits of the values that share the bits chosen so far, then keeps the
    bucket holding the k-th largest. Two passes for float32, four for float64; exact,
    linear time whatever the values (np.partition slows down 30-fold on task vectors
    with few distinct values), and no copy of the tensor -- each pass is a
    `histogram` per block (thread-safe) and one `advance`.

    >>> select = KthLargest(np.float32, 4, 0.5)
    >>> while not select.done:
    ...     select.advance(select.histogram(np.array([0.1, 3.0, 0.5, 2.0], np.float32)))
    >>> select.value
    2.0
    """

    DIGIT_BITS = 16

    def __init__(self, dtype: np.dtype, n: int, density: float) -> None:
        _check_density(density)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise errors.SafeckptError(f"magnitudes must be float32 or float64, not {self.dtype}")
        self.unsigned = np.dtype(np.uint32 if self.dtype == np.float32 else np.uint64)
        self.k = max(1, min(n, int(density * n)))  # rank from the top, within the current bucket
        self.n = n
        self.prefix = 0  # the bits chosen so far
        self.shift = self.dtype.itemsize * 8  # where the chosen bits end

    @property
    def done(self) -> bool:
        return self.shift == 0 or self.n == 0

    @property
    def value(self) -> float:
        """The k-th largest value (inf for no values: nothing is kept)."""
        if self.n == 0:
            return math.inf
        return float(np.array([self.prefix], self.unsigned).view(self.dtype)[0])

    def histogram(self, magnitudes: np.ndarray) -> np.ndarray:
        """Counts of the next 16 bits among `magnitudes` that share the bits chosen so far."""
        keys = np.ascontiguousarray(magnitudes, self.dtype).reshape(-1).view(self.unsigned)
        shift = self.shift - self.DIGIT_BITS
        if self.shift < self.dtype.itemsize * 8:
            keys = keys[(keys >> self.unsigned.type(self.shift)) == self.unsigned.type(self.prefix)]
        digits = (keys >> self.unsigned.type(shift)) & self.unsigned.type((1 << self.DIGIT_BITS) - 1)
        return np.bincount(digits.astype(np.intp), minlength=1 << self.DIGIT_BITS)

    def advance(self, histogram: np.ndarray) -> None:
        """Choose the bucket of the k-th largest from the summed histograms of every block."""
        above = np.cumsum(histogram[::-1])  # values in this bucket or a higher one
        top = int(np.searchsorted(above, self.k))  # buckets counted from the top
        bucket = len(histogram) - 1 - top
        self.k -= int(above[top - 1]) if top else 0
        self.prefix = (self.prefix << self.DIGIT_BITS) | bucket
        self.shift -= self.DIGIT_BITS


def tensor_rng(seed: int, index: int, name: str) -> np.random.Generator:
    """The generator of DARE's draws for input `index` and tensor `name` (stable across runs and machines).

    >>> tensor_rng(0, 1, "w").random() == tensor_rng(0, 1, "w").random()
    True
    """
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    words = np.frombuffer(digest, dtype="<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), *words]))


# --- per-block kernels -------------------------------------------------------------

def weighted_sum(blocks: Iterable[np.ndarray], weights: Sequence[float], dtype: np.dtype, *,
                 total: Optional[float] = None, out: Optional[np.ndarray] = None,
                 temp: Optional[np.ndarray] = None) -> np.ndarray:
    """sum_i w_i x_i in `dtype`, divided by `total` if given: the kernel of linear, ema and slerp.

    A weighted average is computed as sum_i c_i x_i / sum_i c_i with the weights as
    given: one rounding fewer, and for equal weights exactly numpy's
    ``(x_1 + ... + x_n) / n`` in `dtype`. `blocks` may be an iterator: each block is
    used up before the next is taken, so all can be read into one buffer. `out` and
    `temp` (of `dtype`, the blocks' size) are used instead of new arrays.

    >>> weighted_sum([np.ones(2, np.float16), np.ones(2, np.float16)], [0.5, 2.0], np.float32)
    array([2.5, 2.5], dtype=float32)
    >>> weighted_sum([np.ones(2), np.zeros(2), np.zeros(2)], [1, 1, 1], np.float64, total=3)
    array([0.33333333, 0.33333333])
    """
    dtype = np.dtype(dtype)
    acc = out
    for k, (block, w) in enumerate(zip(blocks, weights)):
        if w == 1 and k == 0:  # x * 1 is x: a copy (or a widening) is enough
            acc = np.array(block, dtype=dtype) if acc is None else _copy_into(acc, block)
        elif w == 1:
            np.add(acc, block, out=acc, dtype=dtype)
        elif k == 0:
            acc = np.multiply(block, dtype.type(w), out=acc, dtype=dtype)
        else:
            if temp is None:
                temp = np.empty_like(acc)
            np.multiply(block, dtype.type(w), out=temp, dtype=dtype)
            acc += temp
    if total is not None and total != 1:
        acc /= dtype.type(total)
    return acc


def _copy_into(out: np.ndarray, block: np.ndarray) -> np.ndarray:
    np.copyto(out, block, casting="unsafe")
    return out


def task_arithmetic_block(base: np.ndarray, blocks: Iterable[np.ndarray], weights: Sequence[float],
                          lam: float, dtype: np.dtype, *, out: Optional[np.ndarray] = None,
                          temp: Optional[np.ndarray] = None) -> np.ndarray:
    """b + lambda sum_i w_i (x_i - b), in `dtype` (`blocks`, `out`, `temp` as in `weighted_sum`).

    >>> task_arithmetic_block(np.zeros(2), [np.ones(2), np.ones(2)], [1, 1], 0.5, np.dtype(np.float64))
    array([1., 1.])
    """
    dtype = np.dtype(dtype)
    b = base.astype(dtype, copy=False)
    total = _zeros(out, b.shape, dtype)
    tau = temp if temp is not None else np.empty_like(total)
    for block, w in zip(blocks, weights):
        np.subtract(block, b, out=tau, dtype=dtype)
        tau *= dtype.type(w)
        total += tau
    total *= dtype.type(lam)
    total += b
    return total


def ties_block(base: np.ndarray, blocks: Sequence[np.ndarray], weights: Sequence[float],
               thresholds: Sequence[float], lam: float, dtype: np.dtype, *,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    """TIES on one block, given each task vector's magnitude threshold (`ties_threshold`).

    >>> ties_block(np.zeros(2), [np.array([1., -1.]), np.array([3., 2.])], [1, 1], [0, 0], 1, np.dtype(np.float64))
    array([2., 2.])
    """
    dtype = np.dtype(dtype)
    b = base.astype(dtype, copy=False)
    trimmed = []
    mass = np.zeros(b.shape, dtype)
    for block, w, threshold in zip(blocks, weights, thresholds):
        tau = np.subtract(block, b, dtype=dtype)
        tau *= np.abs(tau) >= dtype.type(threshold)  # trim: the rest become 0 (no sign, never agree)
        tau *= dtype.type(w)  # weighted, as mergekit elects signs and averages
        mass += tau
        trimmed.append(tau)
    elected = np.where(mass >= 0, dtype.type(1), dtype.type(-1))  # mass 0: +, as mergekit
    merged, divisor = _zeros(out, b.shape, dtype), mass
    divisor[...] = 0
    agree = np.empty(b.shape, bool)
    for tau, w in zip(trimmed, weights):
        np.greater(tau * elected, 0, out=agree)
        tau *= agree
        merged += tau
        divisor += agree * dtype.type(w)
    divisor[divisor == 0] = 1
    merged /= divisor
    merged *= dtype.type(lam)
    merged += b
    return merged


def dare_keep(rng: np.random.Generator, size: int, density: float, *,
              out: Optional[np.ndarray] = None, draws: Optional[np.ndarray] = None) -> np.ndarray:
    """The next `size` keep/drop draws of `rng`: True with probability `density`.

    One float64 per entry, so drawing in pieces gives the same mask as drawing at
    once. `out` (bool) and `draws` (float64) are buffers of `size` to use.
    """
    values = rng.random(size) if draws is None else rng.random(size, out=draws)
    return np.less(values, density, out=out)


def dare_block(base: np.ndarray, blocks: Iterable[np.ndarray], keeps: Sequence[np.ndarray],
               weights: Sequence[float], density: float, lam: float, dtype: np.dtype, *,
               out: Optional[np.ndarray] = None, temp: Optional[np.ndarray] = None) -> np.ndarray:
    """DARE-linear on one block: b + lambda sum_i w_i keep_i (x_i - b) / density
    (`blocks`, `out`, `temp` as in `weighted_sum`).

    >>> dare_block(np.zeros(2), [np.ones(2)], [np.array([True, False])], [1], 0.5, 1, np.dtype(np.float64))
    array([2., 0.])
    """
    dtype = np.dtype(dtype)
    b = base.astype(dtype, copy=False)
    total = _zeros(out, b.shape, dtype)
    tau = temp if temp is not None else np.empty_like(total)
    for block, keep, w in zip(blocks, keeps, weights):
        np.subtract(block, b, out=tau, dtype=dtype)
        tau *= keep
        tau *= dtype.type(w / density)
        total += tau
    total *= dtype.type(lam)
    total += b
    return total


def _zeros(out: Optional[np.ndarray], shape: tuple, dtype: np.dtype) -> np.ndarray:
    if out is None:
        return np.zeros(shape, dtype)
    out[...] = 0
    return out


# --- whole arrays ------------------------------------------------------------------

def linear(arrays: Sequence[np.ndarray], weights: Optional[Sequence[float]] = None, *,
           normalize: bool = True) -> np.ndarray:
    """Weighted average (model soup) of same-shape arrays, in the accumulation dtype.

    >>> linear([np.zeros(2, np.float32), np.ones(2, np.float32)])
    array([0.5, 0.5], dtype=float32)
    """
    arrays = _same_shapes(arrays)
    w = linear_weights(len(arrays), weights, normalize=False)
    if normalize:
        linear_weights(len(arrays), w, normalize=True)  # refuses weights that sum to 0
    dtype = accumulation_dtype(x.dtype for x in arrays)
    return weighted_sum(arrays, w.tolist(), dtype, total=float(w.sum()) if normalize else None)


def ema(arrays: Sequence[np.ndarray], decay: float) -> np.ndarray:
    """Exponential moving average over `arrays` in order (the first is the oldest).

    >>> ema([np.zeros(1, np.float32), np.ones(1, np.float32)], 0.9)
    array([0.1], dtype=float32)
    """
    arrays = _same_shapes(arrays)
    return weighted_sum(arrays, ema_weights(len(arrays), decay).tolist(), accumulation_dtype(x.dtype for x in arrays))


def slerp(a: np.ndarray, b: np.ndarray, t: float = 0.5) -> np.ndarray:
    """Spherical interpolation between two same-shape arrays (lerp when nearly parallel).

    >>> slerp(np.array([1., 0.]), np.array([0., 1.]), 0.5)
    array([0.70710678, 0.70710678])
    """
    a, b = _same_shapes([a, b])
    dtype = accumulation_dtype([a.dtype, b.dtype])
    a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    coefficients = slerp_weights(float(a64 @ b64), float(np.sqrt(a64 @ a64)), float(np.sqrt(b64 @ b64)), t)
    return weighted_sum([a, b], coefficients, dtype)


def task_arithmetic(base: np.ndarray, arrays: Sequence[np.ndarray], *, lam: float = 1.0,
                    weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """base + lam * sum_i w_i (x_i - base).

    >>> task_arithmetic(np.zeros(1), [np.ones(1), np.full(1, 2.0)], lam=0.5)
    array([1.5])
    """
    base, *arrays = _same_shapes([base, *arrays])
    w = _task_weights(weights, len(arrays))
    dtype = accumulation_dtype([base.dtype] + [x.dtype for x in arrays])
    return task_arithmetic_block(base, arrays, w, lam, dtype)


def ties(base: np.ndarray, arrays: Sequence[np.ndarray], *, density: float = 0.2, lam: float = 1.0,
         weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """TIES-merging: trim each task vector to its top `density`, elect signs, disjoint mean.

    >>> ties(np.zeros(2), [np.array([1., -4.]), np.array([3., 2.])], density=1.0)
    array([ 2., -4.])
    """
    base, *arrays = _same_shapes([base, *arrays])
    w = _task_weights(weights, len(arrays))
    dtype = accumulation_dtype([base.dtype] + [x.dtype for x in arrays])
    b = base.astype(dtype)
    thresholds = [ties_threshold(np.abs(np.subtract(x, b, dtype=dtype)), density) for x in arrays]
    return ties_block(b, arrays, w, thresholds, lam, dtype)


def dare(base: np.ndarray, arrays: Sequence[np.ndarray], *, density: float = 0.2, lam: float = 1.0,
         weights: Optional[Sequence[float]] = None, seed: int = 0, name: str = "") -> np.ndarray:
    """DARE-linear: drop task-vector entries with probability 1 - density, rescale, add up.

    `name` is the tensor's name: with `seed` and each input's position it picks the draws.

    >>> dare(np.zeros(4), [np.ones(4)], density=1.0)
    array([1., 1., 1., 1.])
    """
    base, *arrays = _same_shapes([base, *arrays])
    _check_density(density)
    w = _task_weights(weights, len(arrays))
    dtype = accumulation_dtype([base.dtype] + [x.dtype for x in arrays])
    keeps = [dare_keep(tensor_rng(seed, i, name), base.size, density).reshape(base.shape)
             for i in range(len(arrays))]
    return dare_block(base, arrays, keeps, w, density, lam, dtype)


# --- checks ------------------------------------------------------------------------

def _same_shapes(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    arrays = [np.asarray(x) for x in arrays]
    if not arrays:
        raise errors.SafeckptError("nothing to merge: no arrays given")
    shapes = {x.shape for x in arrays}
    if len(shapes) > 1:
        raise errors.SafeckptError(f"cannot merge arrays of different shapes: {[list(x.shape) for x in arrays]}")
    return arrays


def _check_weights(weights: Sequence[float], count: int) -> np.ndarray:
    w = np.asarray(list(weights), dtype=np.float64)
    if w.ndim != 1 or w.size != count:
        raise errors.SafeckptError(f"{w.size} weights for {count} inputs: give one weight per input")
    if not np.all(np.isfinite(w)):
        raise errors.SafeckptError(f"the weights must be finite numbers, got {w.tolist()}")
    return w


def _task_weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
    return [1.0] * count if weights is None else _check_weights(weights, count).tolist()


def _check_unit(what: str, value: float) -> None:
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise errors.SafeckptError(f"{what} must be a number in [0, 1], got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_density(density: float) -> None:
    if not (_is_number(density) and 0.0 < density <= 1.0):
        raise errors.SafeckptError(f"density must be in (0, 1], got {density!r}")
