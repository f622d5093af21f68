"""Fuzzing every foreign format through every entry point: a value or a SafeckptError, nothing else.

Seeds are small real files: torch.save zip and legacy files (state dicts with views,
shared storages, bf16, optimizer-like nesting), a plain pickle, an npy object array
and an npz. Each example mutates one (bytes flipped or set, truncated, spliced,
appended) and runs it through open_source (every tensor read, the tree JSON-dumped),
scan, inspect and convert. Whatever happens must be a result or a SafeckptError: no
exception from deep inside, no hang, no large allocation for a file of a few KiB.
(``SAFECKPT_FUZZ_EXAMPLES=20000`` for a long run.)
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import errors
from safeckpt.cli.inspect import describe

from tests.files import torch_save_bytes

torch = pytest.importorskip("torch")

# A file of a few KiB: reading it may allocate a few copies of it, never this much.
MAX_PEAK_BYTES = 64 * 1024 * 1024
# SAFECKPT_FUZZ_EXAMPLES=20000 for a long stress run. The deadline (ms) only catches a mutant that hangs.
FUZZ = settings(max_examples=int(os.environ.get("SAFECKPT_FUZZ_EXAMPLES", 300)), deadline=10_000,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seeds() -> list[bytes]:
    torch.manual_seed(0)
    big = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"big": big, "rows": big[1:3], "cols": big[:, ::2], "bf": big.bfloat16(),
             "ids": torch.arange(3), "opt": {"state": {0: {"step": torch.tensor(2.0)}},
                                            "param_groups": [{"lr": 0.1, "params": [0]}]},
             "epoch": 3, "name": "run"}
    object_array = io.BytesIO()
    np.save(object_array, np.array([np.arange(3), {"a": 1}], dtype=object), allow_pickle=True)
    npz = io.BytesIO()
    np.savez(npz, w=np.arange(6, dtype=np.float32), b=np.ones(2, np.int8))
    return [
        torch_save_bytes(state),
        torch_save_bytes(state, _use_new_zipfile_serialization=False),
        pickle.dumps({"w": np.arange(4, dtype=np.float32), "meta": {"step": 1}}, protocol=4),
        object_array.getvalue(),
        npz.getvalue(),
    ]


SEEDS = _seeds()


def _mutate(data: bytes, rng: random.Random, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0 and out:  # flip bits
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:  # set a byte to an interesting value
            out[rng.randrange(len(out))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, ord("."), ord("("), 0x8A])
        elif kind == 2:  # truncate
            del out[rng.randrange(len(out) + 1):]
        elif kind == 3 and out:  # splice a copy of a chunk elsewhere
            i, j = sorted(rng.randrange(len(out)) for _ in range(2))
            k = rng.randrange(len(out))
            out[k:k] = out[i:j][:256]
        else:  # append
            out += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
    return bytes(out)


def _every_entry_point(path, tmp_path) -> None:
    try:
        with safeckpt.open_source(path) as source:
            json.dumps(source.tree)
            for name in source.keys():
                source.read(name).tobytes()
    except errors.SafeckptError:
        pass
    report = safeckpt.scan(path)
    assert report.verdict in ("safe", "suspicious", "malicious")
    try:
        describe(path)
    except errors.SafeckptError:
        pass
    try:
        safeckpt.convert(path, tmp_path / "out.safetensors", allow_unsafe_structure=True, verify=True)
    except errors.SafeckptError:
        pass


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), salt=st.integers(0, 2**32 - 1), count=st.integers(1, 4))
def test_mutated_files_fail_cleanly(tmp_path, seed, salt, count):
    data = _mutate(SEEDS[seed], random.Random(salt), count)
    path = tmp_path / "fuzzed.bin"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        _every_entry_point(path, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"{peak} bytes allocated for a {len(data)}-byte file"


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_truncation_fails_cleanly(tmp_path, seed):
    data = SEEDS[seed]
    step = max(1, len(data) // 150)
    for cut in range(0, len(data), step):
        path = tmp_path / "cut.bin"
        path.write_bytes(data[:cut])
        _every_entry_point(path, tmp_path)
