"""Cast floating tensors to another safetensors float dtype, in blocks, counting overflow.

Rounding is round-to-nearest-even (numpy for F16/F32/F64, ml_dtypes for BF16
and F8), which is what torch's ``Tensor.to`` does: a cast here gives the same
bits as ``torch.tensor(x).to(dtype)``.

Overflow -- a finite value beyond the target's range:
- targets with an infinity (F16, BF16, F8_E5M2, F32) give ±inf, as IEEE and torch do;
- F8_E4M3 has no infinity: such values (and ±inf) saturate to ±448, as torch
  does (ml_dtypes alone would make them NaN, silently wiping out weights).
Either way they are counted, so a caller can warn that fp16 cannot hold a model.

Underflow -- a non-zero input that becomes ±0 in the target (below half its
smallest subnormal: fp32 -> fp16 loses everything under 3e-8) -- is counted too.

Only floating tensors are cast; integers and bools keep their values by design
(`is_floating` says which dtypes count). F6 types have no numpy representation
and are never cast.

>>> out, overflow = cast_array(np.array([1.0, 7e4], np.float32), "fp16")
>>> out, overflow
(array([1., inf], dtype=float16), 1)

The ``safeckpt cast`` operation itself is `safeckpt.ops.convert.cast`: a
conversion with a target dtype, which uses these pieces.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES, dtype_for_numpy
from ..format.writer import tensor_chunks

# Elements cast at a time: a block's output and overflow check take a few MiB (they
# stay in cache, and a cast adds that much memory whatever the tensor's size).
BLOCK_ELEMENTS = 1024 * 1024

# Accepted spellings of each target (compared case-insensitively): safetensors names,
# the short names of --dtype, numpy/torch names.
_TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "F64": ("fp64", "float64", "f64", "double", "torch.float64"),
    "F32": ("fp32", "float32", "f32", "float", "single", "torch.float32"),
    "F16": ("fp16", "float16", "f16", "half", "torch.float16"),
    "BF16": ("bf16", "bfloat16", "torch.bfloat16"),
    "F8_E4M3": ("fp8", "fp8_e4m3", "f8_e4m3", "f8_e4m3fn", "e4m3", "float8_e4m3fn", "torch.float8_e4m3fn"),
    "F8_E5M2": ("fp8_e5m2", "f8_e5m2", "e5m2", "float8_e5m2", "torch.float8_e5m2"),
}
_TARGETS: dict[str, str] = {alias.lower(): name for name, aliases in _TARGET_ALIASES.items()
                            for alias in (name, *aliases)}

# Source dtypes that are cast (floating types numpy/ml_dtypes can compute with).
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                      "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"})

# How to see a non-finite output value in its bits: (unsigned view, mask without the
# sign, smallest non-finite pattern). Counting bits is several times faster than
# np.isfinite on half and ml_dtypes arrays.
_NON_FINITE_BITS: dict[str, tuple[type, int, int]] = {
    "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7F, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F, 0x7F),  # no inf: S.1111.111 is NaN
}

# Targets without an infinity: overflow saturates to the largest finite value (torch's rule).
_SATURATING = frozenset({"F8_E4M3"})


def target_dtype(name: str) -> str:
    """The safetensors name of a cast target given in any accepted spelling.

    >>> target_dtype("bfloat16"), target_dtype("fp16"), target_dtype("F8_E4M3")
    ('BF16', 'F16', 'F8_E4M3')
    """
    found = _TARGETS.get(str(name).strip().lower())
    if found is None:
        raise errors.SafeckptError(
            f"cannot cast to {name!r}: choose one of bf16, fp16, fp32, fp64, F8_E4M3, F8_E5M2 "
            "(safetensors, numpy and torch spellings are accepted)")
    return found


def is_floating(dtype: str) -> bool:
    """True for the safetensors dtypes a cast applies to (ints, bool, complex and F6 are kept)."""
    return dtype in FLOATING


class CastBlock(NamedTuple):
    """A block of cast values and how many of them overflowed or underflowed."""

    values: np.ndarray
    overflow: int
    underflow: int


def cast_blocks(array: np.ndarray, target: str) -> Iterator[CastBlock]:
    """The values of `array` in C order, cast to `target`, as 1-D blocks with overflow counts.

    Memory is bounded by a block whatever the array's size or strides.

    >>> [(b.values.tolist(), b.overflow) for b in cast_blocks(np.ones((2, 2), np.float32).T, "bf16")]
    [([1.0, 1.0, 1.0, 1.0], 0)]
    """
    name = target_dtype(target)
    _source_dtype(array)
    out_dtype = DTYPES[name].numpy
    over = _can_overflow(array.dtype, out_dtype)
    under = _can_underflow(array.dtype, out_dtype)
    for values in _flat_pieces(array):
        for start in range(0, values.size, BLOCK_ELEMENTS):
            block = values[start:start + BLOCK_ELEMENTS]
            with np.errstate(over="ignore", invalid="ignore", under="ignore"):
                out = block.astype(out_dtype)
            yield CastBlock(out, _fix_overflow(block, out, name) if over else 0,
                            _count_underflow(block, out, name) if under else 0)


def cast_array(array: np.ndarray, target: str) -> tuple[np.ndarray, int]:
    """`array` cast to `target` (a new C-contiguous array) and the count of values that overflowed.

    An array already of the target dtype is returned as it is.

    >>> cast_array(np.array([1.0, 1e5], np.float32), "bf16")
    (array([1, 99840], dtype=bfloat16), 0)
    """
    name = target_dtype(target)
    _source_dtype(array)
    out_dtype = DTYPES[name].numpy
    if array.dtype == out_dtype:
        return array, 0
    out = np.empty(array.shape, out_dtype)
    flat = out.reshape(-1)
    position = overflow = 0
    for block in cast_blocks(array, name):
        flat[position:position + block.values.size] = block.values
        position += block.values.size
        overflow += block.overflow
    return out, overflow


def _source_dtype(array: np.ndarray) -> str:
    found = dtype_for_numpy(array.dtype) if isinstance(array, np.ndarray) else None
    if found is None or found.name not in FLOATING:
        what = found.name if found is not None else getattr(array, "dtype", type(array).__name__)
        raise errors.UnsupportedTensorError(
            f"only floating tensors are cast ({', '.join(sorted(FLOATING))}); this one is {what}")
    return found.name


def _flat_pieces(array: np.ndarray) -> Iterator[np.ndarray]:
    """1-D pieces of `array` in C order, little-endian; views where the array allows."""
    if array.dtype.name == "float4_e2m1fn":  # tensor_chunks would pack these two per byte
        yield np.ascontiguousarray(array).reshape(-1)
        return
    little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    for chunk in tensor_chunks(array):
        yield np.frombuffer(chunk, dtype=little)


def _can_overflow(source: np.dtype, target: np.dtype) -> bool:
    import ml_dtypes  # at call time: a conversion that casts nothing never needs it (1 s+ to import)

    return float(ml_dtypes.finfo(source).max) > float(ml_dtypes.finfo(target).max)


def _can_underflow(source: np.dtype, target: np.dtype) -> bool:
    import ml_dtypes

    return float(ml_dtypes.finfo(source).smallest_subnormal) < float(ml_dtypes.finfo(target).smallest_subnormal)


def _count_underflow(block: np.ndarray, out: np.ndarray, target: str) -> int:
    """Non-zero inputs that became ±0: zeros stay zeros, so it is the drop in the non-zero count."""
    unsigned, mask, _ = _NON_FINITE_BITS[target]
    lost = np.count_nonzero(block) - np.count_nonzero(out.view(unsigned) & unsigned(mask))
    return int(lost)


def _fix_overflow(block: np.ndarray, out: np.ndarray, target: str) -> int:
    """Count finite inputs that became non-finite; saturate them where the target has no inf."""
    unsigned, mask, first = _NON_FINITE_BITS[target]
    bits = out.view(unsigned) & unsigned(mask)
    if not np.count_nonzero(bits >= first):  # the common case: nothing to look at
        return 0
    became = bits >= first
    finite_in = np.isfinite(block)
    overflow = int(np.count_nonzero(became & finite_in))
    if target in _SATURATING:
        clip = became & ~np.isnan(block)  # ±inf saturates too, as in torch
        import ml_dtypes

        largest = out.dtype.type(float(ml_dtypes.finfo(out.dtype).max))
        out[clip] = np.where(np.signbit(block[clip]), -largest, largest)
    return overflow
