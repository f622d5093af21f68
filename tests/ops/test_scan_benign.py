"""No false alarms: files the real libraries write scan safe, whatever the reader looks at."""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import logging
import pathlib
import pickle
import random
import types
import typing
import uuid

import numpy as np
import pytest

from tests.ops.scan_checks import assert_safe


def test_plain_data_of_the_standard_library_is_safe(tmp_path):
    value = {
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        "day": datetime.date(2024, 1, 2), "at": datetime.time(3, 4), "took": datetime.timedelta(seconds=5),
        "lr": decimal.Decimal("0.001"), "ratio": fractions.Fraction(1, 3), "run": uuid.uuid4(),
        "counts": collections.Counter("aab"), "recent": collections.deque([1, 2], maxlen=3),
        "ns": types.SimpleNamespace(a=1), "steps": range(0, 10, 2), "path": pathlib.PurePosixPath("/data/x"),
        "type": typing.Optional[int], "types": typing.Dict[str, typing.List[float]], "none": type(None),
        "generic": list[int], "log": logging.getLogger("train"), "rng": random.Random(0).getstate(),
        "od": collections.OrderedDict(a=1), "fs": frozenset({1, 2}), "cx": 1 + 2j, "big": 2**200,
    }
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        assert_safe(path)


def test_torch_training_files_are_safe(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": torch.amp.GradScaler("cpu").state_dict(), "torch_rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state(), "python_rng": random.getstate(), "step": 10,
             "fp8": torch.randn(4).to(torch.float8_e4m3fn), "u16": torch.zeros(3, dtype=torch.uint16)}
    for protocol in (2, 4, 5):
        torch.save(state, tmp_path / f"zip{protocol}.pt", pickle_protocol=protocol)
        assert assert_safe(tmp_path / f"zip{protocol}.pt").format == "torch-zip"
    legacy_state = {k: v for k, v in state.items() if k not in ("fp8", "u16")}  # dtypes with no legacy storage
    torch.save(legacy_state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert assert_safe(tmp_path / "legacy.pt").format == "torch-legacy"


def test_torch_distributed_checkpoint_metadata_is_safe(tmp_path):
    torch = pytest.importorskip("torch")
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    dcp.save({"w": torch.randn(4, 4), "step": torch.tensor(3)}, checkpoint_id=str(tmp_path / "ckpt"))
    for path in sorted((tmp_path / "ckpt").iterdir()):
        if path.name == ".metadata":
            assert_safe(path)


def test_paddle_and_numpy_files_are_safe(tmp_path):
    np.savez_compressed(tmp_path / "a.npz", x=np.ones(3), obj=np.array([{"a": 1}, None], dtype=object))
    np.save(tmp_path / "b.npy", np.array([[1.5]], dtype=">f8"))
    assert_safe(tmp_path / "a.npz")
    assert_safe(tmp_path / "b.npy")
    paddle = pytest.importorskip("paddle")
    layer = paddle.nn.Linear(3, 2)
    paddle.save(layer.state_dict(), str(tmp_path / "m.pdparams"))
    opt = paddle.optimizer.Adam(parameters=layer.parameters())
    paddle.save(opt.state_dict(), str(tmp_path / "m.pdopt"))
    assert_safe(tmp_path / "m.pdparams")
    assert_safe(tmp_path / "m.pdopt")
