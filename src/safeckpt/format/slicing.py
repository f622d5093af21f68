"""numpy basic indexing over tensor bytes that are not in memory yet.

`normalize_index` turns any basic index (ints, negative ints, slices with any
step, `...`, and the empty list, which selects nothing along the first axis as
in numpy) into one selector per axis, checked against the shape. Lists of
indices (numpy's advanced indexing) are refused, as safetensors refuses them.
`gather` then reads only the bytes the selection needs: one read of the
bounding span when that span is small, otherwise one read per selected row,
recursively.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Union

import numpy as np

from .. import errors

Selector = Union[int, range]

# Reading a bounding span is cheaper than many small reads as long as it is not
# much larger than what was asked for.
_SPAN_SLACK = 4
_SPAN_FLOOR = 1 << 20


def normalize_index(index, shape: tuple[int, ...], path=None, tensor=None) -> list[Selector]:
    """One int or range per axis; raise SliceError like numpy would."""
    if isinstance(index, list):
        if index:
            raise errors.SliceError(
                f"lists of indices ({_shown(index)}: numpy advanced indexing) are not supported; index with "
                "ints and slices, or read the tensor with get_tensor() and index that", path=path, tensor=tensor)
        index = slice(0, 0)
    items = list(index) if isinstance(index, tuple) else [index]
    ellipses = sum(1 for item in items if item is Ellipsis)
    if ellipses > 1:
        raise errors.SliceError("an index can only have a single ellipsis ('...')", path=path, tensor=tensor)
    explicit = len(items) - ellipses
    if explicit > len(shape):
        raise errors.SliceError(
            f"too many indices: {explicit} given for a tensor of shape {list(shape)}", path=path, tensor=tensor)
    if ellipses:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - explicit)
    items += [slice(None)] * (len(shape) - len(items))
    return [_selector(item, dim, axis, path, tensor) for axis, (item, dim) in enumerate(zip(items, shape))]


def _selector(item, dim: int, axis: int, path, tensor) -> Selector:
    if isinstance(item, slice):
        try:
            return range(*item.indices(dim))
        except (TypeError, ValueError) as exc:
            raise errors.SliceError(f"invalid slice {item} on axis {axis}: {exc}", path=path, tensor=tensor) from None
    if isinstance(item, (bool, np.bool_)) or item is None:
        raise errors.SliceError(
            f"unsupported index {item!r} on axis {axis}: only ints, slices and '...' are supported "
            "(reshape the result to add axes)", path=path, tensor=tensor)
    try:
        position = operator.index(item)
    except TypeError:
        raise errors.SliceError(
            f"unsupported index {_shown(item)} on axis {axis}: only ints, slices and '...' are supported",
            path=path, tensor=tensor) from None
    if not -dim <= position < dim:
        raise errors.SliceError(
            f"index {position} is out of bounds for axis {axis} with size {dim}", path=path, tensor=tensor)
    return position % dim


def _shown(item, limit: int = 40) -> str:
    """`item` for a message, cut short: an index may be a list of a million ints."""
    text = repr(item)
    return text if len(text) <= limit else text[:limit] + "..."


def result_shape(selectors: list[Selector]) -> tuple[int, ...]:
    return tuple(len(s) for s in selectors if isinstance(s, range))


def as_numpy_index(selectors: list[Selector]) -> tuple:
    """The selectors as a numpy basic index (for arrays already in memory)."""
    return tuple(s if isinstance(s, int) else _range_to_slice(s) for s in selectors)


def _range_to_slice(r: range) -> slice:
    if not r:
        return slice(0, 0)
    stop = r.stop if r.stop >= 0 else None  # a descending range that runs through index 0
    return slice(r.start, stop, r.step)


def gather(read: Callable[[int, int], np.ndarray], base: int, shape: tuple[int, ...],
           dtype: np.dtype, selectors: list[Selector]) -> np.ndarray:
    """Read the selected elements of a C-ordered tensor stored at byte `base`."""
    out_shape = result_shape(selectors)
    if any(len(s) == 0 for s in selectors if isinstance(s, range)):
        return np.empty(out_shape, dtype=dtype)
    strides = _c_strides(shape, dtype.itemsize)
    lows = [s if isinstance(s, int) else min(s[0], s[-1]) for s in selectors]
    highs = [s if isinstance(s, int) else max(s[0], s[-1]) for s in selectors]
    start = base + sum(lo * st for lo, st in zip(lows, strides))
    span = sum((hi - lo) * st for lo, hi, st in zip(lows, highs, strides)) + dtype.itemsize
    wanted = math.prod(out_shape) * dtype.itemsize
    if span <= max(_SPAN_SLACK * wanted, _SPAN_FLOOR) or len(shape) <= 1:
        raw = read(start, span)
        window = np.ndarray(tuple(hi - lo + 1 for lo, hi in zip(lows, highs)), dtype=dtype,
                            buffer=raw, strides=strides)
        local = [s - lo if isinstance(s, int) else range(s.start - lo, s.stop - lo, s.step)
                 for s, lo in zip(selectors, lows)]
        return np.ascontiguousarray(window[as_numpy_index(local)]).reshape(out_shape)
    out = np.empty(out_shape, dtype=dtype)
    first, rest = selectors[0], selectors[1:]
    if isinstance(first, int):
        out[...] = gather(read, base + first * strides[0], shape[1:], dtype, rest)
    else:
        for position, row in enumerate(first):
            out[position] = gather(read, base + row * strides[0], shape[1:], dtype, rest)
    return out


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))
