"""diff_sums against exact sums (math.fsum over float64 copies)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeckpt.ops.diff import sums as diff_sums
from safeckpt.ops.diff.sums import Sums, Tolerance, part_sums

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
          np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.int32), np.dtype(np.bool_), np.dtype(">f4")]
NO_TOLERANCE = Tolerance.of(None, None)


def exact(a: np.ndarray, b: np.ndarray, tolerance: Tolerance) -> Sums:
    """The sums, the slow and exact way: math.fsum over the finite pairs."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _exact(a.astype(np.float64), b.astype(np.float64), tolerance)


def _exact(a: np.ndarray, b: np.ndarray, tolerance: Tolerance) -> Sums:
    finite = np.isfinite(a) & np.isfinite(b)
    match = (np.isnan(a) & np.isnan(b)) | (a == b)
    fa, fb = a[finite], b[finite]
    d = fa - fb
    beyond = int(np.count_nonzero(np.abs(d) > tolerance.atol + tolerance.rtol * np.abs(fa))) if tolerance.given else 0
    return Sums(int(finite.sum()), math.fsum(fa * fa), math.fsum(fb * fb), math.fsum(fa * fb), math.fsum(d * d),
                math.fsum(np.abs(d)), float(np.abs(d).max()) if d.size else 0.0, int(np.count_nonzero(d)),
                int(np.count_nonzero(~finite & ~match)), beyond)


def assert_close(got: Sums, want: Sums, rel: float = 1e-13) -> None:
    for key in ("finite", "changed", "nonfinite", "beyond", "abs_max"):
        assert getattr(got, key) == getattr(want, key), key
    scale = math.sqrt(want.aa * want.bb)  # a.b may cancel: its error is relative to the norms
    for key in ("aa", "bb", "dd", "abs_sum"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=rel, abs=1e-300), key
    assert got.ab == pytest.approx(want.ab, rel=rel, abs=rel * scale + 1e-300)


@pytest.fixture(params=["default blocks", "small blocks"])
def blocks(request, monkeypatch):
    """Small blocks and dot pieces, none a multiple of the other: many ragged boundaries."""
    if request.param == "small blocks":
        monkeypatch.setattr(diff_sums, "BLOCK_ELEMENTS", 1000)
        monkeypatch.setattr(diff_sums, "DOT_PIECE", 300)
    return request.param


@pytest.mark.parametrize("dtype_a", DTYPES, ids=str)
@pytest.mark.parametrize("dtype_b", DTYPES[:4], ids=str)
def test_every_kind_pair_against_exact_sums(blocks, dtype_a, dtype_b):
    rng = np.random.default_rng(3)
    n = 5000 + 3  # with small blocks: several blocks and a ragged tail
    a = (rng.standard_normal(n) * 4).astype(dtype_a)
    b = (a.astype(np.float64) + rng.standard_normal(n) * 0.01).astype(dtype_b)
    b[::7] = a[::7].astype(dtype_b)  # some pairs equal
    tolerance = Tolerance.of(0.01, 0.001)
    assert_close(part_sums(a, b, tolerance), exact(a, b, tolerance))


def test_every_fp16_and_bf16_bit_pattern_is_read_exactly():
    patterns = np.arange(1 << 16, dtype=np.uint16)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for dtype in (np.dtype(np.float16), bf16, bf16.newbyteorder(">")):
        values = patterns.view(dtype)
        with np.errstate(invalid="ignore"):
            as_f64 = values.astype(np.float64)
        zeros = np.zeros_like(values)
        for i in range(0, patterns.size, 4099):  # one value at a time, sampled, plus every pattern at once
            got = part_sums(values[i:i + 1], zeros[:1], NO_TOLERANCE)
            if np.isfinite(as_f64[i]):
                assert (got.finite, got.abs_max, got.aa) == (1, abs(as_f64[i]), as_f64[i] ** 2), (dtype, i)
        assert_close(part_sums(values, zeros, NO_TOLERANCE), exact(as_f64, zeros.astype(np.float64), NO_TOLERANCE))
        # against itself: NaNs with the same bits match, so nothing is counted as changed
        itself = part_sums(values, values, NO_TOLERANCE)
        assert itself.changed == 0 and itself.nonfinite == 0 and itself.dd == 0


def test_nonfinite_values_zeros_and_overflowing_squares():
    a = np.array([np.nan, np.inf, -np.inf, 1.0, np.nan, 0.0, -0.0, 1e300, 2.0, np.inf] * 100)
    b = np.array([np.nan, np.inf, np.inf, np.nan, 1.0, -0.0, 0.0, -1e300, 2.0, np.inf] * 100)
    got = part_sums(a, b, Tolerance.of(0.0, 0.0))
    want = exact(a, b, Tolerance.of(0.0, 0.0))
    assert got.nonfinite == want.nonfinite == 300  # inf vs -inf, 1 vs NaN, NaN vs 1
    assert got.finite == want.finite == 400 and got.changed == want.changed == 100  # +0 and -0 are equal
    assert math.isinf(got.aa) and math.isinf(got.dd) and got.abs_max == want.abs_max == 2e300  # 1e300 squared
    assert got.beyond == want.beyond == 100


def test_sums_are_more_accurate_than_a_plain_dot():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1 << 20)
    got = part_sums(a, np.zeros_like(a), NO_TOLERANCE).aa
    assert got == pytest.approx(math.fsum(a * a), rel=1e-14)


def test_views_of_a_read_only_file_mapping_and_odd_offsets(tmp_path):
    data = np.arange(10_001, dtype=np.float32)
    path = tmp_path / "raw.bin"
    path.write_bytes(b"\0\0" + data.tobytes())  # a 2-byte offset: misaligned floats
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    x = mapped[2:].view(np.float32)
    assert not x.flags.writeable and x.ctypes.data % 4 == 2
    got = part_sums(x, data + 1, NO_TOLERANCE)
    assert (got.finite, got.changed, got.abs_max, got.abs_sum) == (10_001, 10_001, 1.0, 10_001.0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=0, max_size=1200),
       st.integers(0, 2**32 - 1), st.sampled_from([None, (0.0, 0.0), (1e-3, 1e-2)]))
def test_anything_against_exact_sums(values, seed, limits):
    a = np.array(values, dtype=np.float32)
    rng = np.random.default_rng(seed)
    b = a.copy()
    flip = rng.random(a.size) < 0.5
    b[flip] = rng.standard_normal(int(flip.sum())).astype(np.float32)
    tolerance = Tolerance.of(*limits) if limits else NO_TOLERANCE
    got, want = part_sums(a, b, tolerance), exact(a, b, tolerance)
    for key in ("finite", "changed", "nonfinite", "beyond", "abs_max"):
        assert getattr(got, key) == getattr(want, key), key
    for key in ("aa", "bb", "dd", "abs_sum"):  # a.b may cancel: see assert_close
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-12, abs=1e-300), key
