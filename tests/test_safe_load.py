"""safeckpt.torch.safe_load: the tree torch.load(weights_only=True) returns, for real files, without running them."""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import pathlib
import types
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import safeckpt
from safeckpt import errors
from safeckpt.torch import Placeholder, PlaceholderCall, safe_load

from tests.files import tensor_bytes


def assert_same_tree(ours, theirs, path="root", pairs=None):
    """Same structure, types, values and dtypes; tensors that share a storage in one share it in the other."""
    pairs = {} if pairs is None else pairs
    assert type(ours) is type(theirs), f"{path}: {type(ours).__name__} != {type(theirs).__name__}"
    if isinstance(theirs, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset(), ours.requires_grad) == \
            (theirs.dtype, theirs.shape, theirs.stride(), theirs.storage_offset(), theirs.requires_grad), path
        assert ours.device == theirs.device, path
        if theirs.device.type != "meta":
            assert tensor_bytes(ours) == tensor_bytes(theirs), path
            key = (theirs.untyped_storage().data_ptr(), theirs.untyped_storage().nbytes())
            mine = (ours.untyped_storage().data_ptr(), ours.untyped_storage().nbytes())
            assert pairs.setdefault(key, mine) == mine, f"{path}: storage sharing differs"
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs), path
        for key in theirs:
            assert_same_tree(ours[key], theirs[key], f"{path}[{key!r}]", pairs)
        if hasattr(theirs, "_metadata"):
            assert_same_tree(ours._metadata, theirs._metadata, f"{path}._metadata", pairs)
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_tree(a, b, f"{path}[{i}]", pairs)
    elif isinstance(theirs, argparse.Namespace):
        assert_same_tree(vars(ours), vars(theirs), path, pairs)
    elif isinstance(theirs, np.ndarray):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), path
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


def trained_module_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    scheduler.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": 3, "rng": torch.get_rng_state()}


def every_dtype():
    names = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
             "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
             "float8_e4m3fnuz", "float8_e5m2fnuz", "complex32"]
    out = {}
    for name in names:
        dtype = getattr(torch, name, None)
        if dtype is not None:
            out[name] = torch.arange(-3, 9).reshape(3, 4).to(torch.float32).to(dtype) if name != "complex32" else \
                torch.arange(6, dtype=torch.float16).view(torch.complex32)
    return out


def views_and_sharing():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    weight = torch.nn.Parameter(torch.randn(3, 2))
    return {"base": base, "row": base[1], "column": base[:, 2], "transposed": base.t(), "narrow": base[1:3, 2:5],
            "expanded": torch.ones(3)[None].expand(4, 3), "empty": torch.zeros(0, 5), "scalar": torch.tensor(2.5),
            "tied": [weight, weight], "grad": torch.ones(2, requires_grad=True), "param": weight,
            "storage_view": torch.arange(10.0)[3:7]}


def plain_values():
    return {"size": torch.Size([2, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu"), "none": None,
            "nested": [(1, 2.5, "a"), {3: b"bytes", (4, 5): {"deep": [True, False]}}], "big": 2 ** 80,
            "set": {1, 2, 3}, "ordered": collections.OrderedDict(b=1, a=2), "complex": 1 + 2j,
            "counter": collections.Counter({"x": 2})}


CASES = {"module": trained_module_state, "dtypes": every_dtype, "views": views_and_sharing, "plain": plain_values}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "copy"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_torch_load_weights_only(case, mmap, legacy, tmp_path):
    path = tmp_path / "file.pt"
    value = CASES[case]()
    torch.save(value, path, _use_new_zipfile_serialization=not legacy)
    try:
        theirs = torch.load(path, weights_only=True)
    except AttributeError:  # torch cannot read back the dtypes with no storage class from a legacy file
        assert legacy and case == "dtypes"
        theirs = value
    ours = safe_load(path, mmap=mmap)
    assert_same_tree(ours, theirs)


def test_a_transformers_pytorch_model_bin_equals_torch_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    path = tmp_path / "pytorch_model.bin"  # as transformers < 5 saved it: torch.save of the state dict
    torch.save(transformers.GPT2LMHeadModel(config).state_dict(), path)
    ours, theirs = safe_load(path), torch.load(path, weights_only=True)
    assert_same_tree(ours, theirs)
    assert ours["lm_head.weight"].data_ptr() == ours["transformer.wte.weight"].data_ptr()  # tied: one memory


def test_an_old_tar_checkpoint_gives_its_tensors_sharing_storage(tmp_path):
    from tests.sources.test_torch_legacy import IDS, ROOT, sample_tar

    path = tmp_path / "old.pt"
    path.write_bytes(sample_tar())
    with pytest.raises(RuntimeError, match="legacy .tar format"):  # weights_only refuses the format
        torch.load(path, weights_only=True)
    ours = safe_load(path)
    root = torch.from_numpy(ROOT.copy())
    expected = {"w": root.as_strided((3, 2), (1, 3), 1), "b": root[8:12], "v": root[4:9].as_strided((2,), (2,)),
                "ids": torch.from_numpy(IDS.copy()), "epoch": 4, "meta": {"name": "old", "lr": 0.01}}
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
        else:
            assert ours[key] == value
    assert ours["w"].untyped_storage().data_ptr() == ours["b"].untyped_storage().data_ptr()


def test_plain_data_classes_come_back_as_themselves(tmp_path):
    value = {"ns": argparse.Namespace(lr=0.1, layers=[1, 2], sub=argparse.Namespace(a=torch.ones(2))),
             "simple": types.SimpleNamespace(x=1), "path": pathlib.PurePosixPath("/data/train"),
             "array": np.arange(6, dtype=np.int16).reshape(2, 3), "hparams_type": argparse.Namespace}
    torch.save(value, tmp_path / "a.pt")
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(tmp_path / "a.pt", weights_only=True)
    ours = safe_load(tmp_path / "a.pt")
    assert type(ours["ns"]) is argparse.Namespace and ours["ns"].lr == 0.1
    assert torch.equal(ours["ns"].sub.a, torch.ones(2))
    assert ours["simple"] == types.SimpleNamespace(x=1)
    assert isinstance(ours["path"], pathlib.PurePosixPath) and str(ours["path"]) == "/data/train"
    assert ours["array"].flags.writeable and np.array_equal(ours["array"], value["array"])
    assert ours["hparams_type"] is argparse.Namespace
    torch.save(value["ns"], tmp_path / "ns.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert_same_tree(safe_load(tmp_path / "ns.pt"), torch.load(tmp_path / "ns.pt", weights_only=True))


def test_lightning_and_omegaconf_hyperparameters(tmp_path):
    lightning = pytest.importorskip("lightning")
    omegaconf = pytest.importorskip("omegaconf")
    from lightning.fabric.utilities.data import AttributeDict

    config = omegaconf.OmegaConf.create({"model": {"width": 8, "ref": "${model.width}"}, "tags": ["a", "b"]})
    torch.save({"hparams": AttributeDict(lr=0.1), "config": config, "type": type(config)}, tmp_path / "a.ckpt")
    ours = safe_load(tmp_path / "a.ckpt")
    assert type(ours["hparams"]) is AttributeDict and ours["hparams"].lr == 0.1
    assert isinstance(ours["config"], omegaconf.DictConfig) and ours["config"].model.ref == 8
    assert isinstance(ours["config"].tags, omegaconf.ListConfig) and list(ours["config"].tags) == ["a", "b"]
    assert ours["type"] is omegaconf.DictConfig
    assert lightning  # imported for AttributeDict


class Unknown:
    def __init__(self):
        self.weights = torch.arange(3.0)
        self.name = "mine"


def test_unknown_classes_become_inert_placeholders(tmp_path):
    torch.save({"obj": Unknown(), "cls": Unknown}, tmp_path / "a.pt")
    ours = safe_load(tmp_path / "a.pt")
    obj = ours["obj"]
    assert isinstance(obj, PlaceholderCall) and obj.func.qualname == f"{__name__}.Unknown"
    state = obj.state[0]
    assert torch.equal(state["weights"], torch.arange(3.0)) and state["name"] == "mine"
    assert isinstance(ours["cls"], Placeholder) and ours["cls"].name == "Unknown"


def test_shared_storages_stay_shared_and_writes_never_reach_the_file(tmp_path):
    base = torch.arange(12.0)
    torch.save({"a": base[:6], "b": base[6:], "c": base.view(3, 4)}, tmp_path / "a.pt")
    before = hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    ours = safe_load(tmp_path / "a.pt")
    ours["c"][0, 0] = 100.0
    assert ours["a"][0] == 100.0  # the same memory, as in torch.load
    assert hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest() == before
    assert safe_load(tmp_path / "a.pt")["a"][0] == 0.0


def test_the_scan_s_reading_of_the_pickle_is_the_one_loaded(tmp_path, monkeypatch):
    from safeckpt.sources import torch_file

    torch.save({"w": torch.arange(4.0)}, tmp_path / "a.pt")
    runs = []
    original = torch_file._load_pickle
    monkeypatch.setattr(torch_file, "_load_pickle", lambda *a, **k: runs.append(a) or original(*a, **k))
    assert torch.equal(safe_load(tmp_path / "a.pt")["w"], torch.arange(4.0))
    assert runs == []  # the scan read data.pkl; the reader took that reading instead of running it again


def test_copies_outlive_the_file_and_file_objects_work(tmp_path):
    torch.save({"w": torch.arange(5.0)}, tmp_path / "a.pt")
    copied = safe_load(tmp_path / "a.pt", mmap=False)
    mapped = safe_load(tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    os.unlink(tmp_path / "a.pt")
    assert torch.equal(copied["w"], torch.arange(5.0)) and torch.equal(mapped["w"], torch.arange(5.0))
    assert torch.equal(safe_load(io.BytesIO(data))["w"], torch.arange(5.0))
    with pytest.raises(TypeError, match="path or a binary file object"):
        safe_load(42)


@pytest.mark.parametrize("location", ["meta", "device", "dict", "function"])
def test_map_location_as_torch_load(location, tmp_path):
    torch.save({"w": torch.ones(3), "v": torch.ones(3)[1:]}, tmp_path / "a.pt")
    seen = []

    def keep(storage, saved):
        seen.append(saved)
        return storage

    value = {"meta": "meta", "device": torch.device("meta"), "dict": {"cpu": "meta"}, "function": keep}[location]
    ours = safe_load(tmp_path / "a.pt", map_location=value)
    assert seen == (["cpu", "cpu"] if location == "function" else [])  # once per storage (two), as torch.load
    assert_same_tree(ours, torch.load(tmp_path / "a.pt", weights_only=True, map_location=value))


def test_a_file_saved_on_a_gpu_needs_map_location_on_a_cpu_machine(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "cpu.pt")
    with zipfile.ZipFile(tmp_path / "cpu.pt") as source, zipfile.ZipFile(tmp_path / "gpu.pt", "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(info.filename, data)
    with pytest.raises(RuntimeError):
        torch.load(tmp_path / "gpu.pt", weights_only=True)
    with pytest.raises(errors.SourceError, match="saved on 'cuda:0'.*map_location"):
        safe_load(tmp_path / "gpu.pt")
    assert torch.equal(safe_load(tmp_path / "gpu.pt", map_location="cpu")["w"], torch.arange(4.0))


def test_other_formats_give_their_tensors(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    safeckpt.torch.save_file(tensors, tmp_path / "m.safetensors")
    assert_same_tree(safe_load(tmp_path / "m.safetensors"), tensors)
    manager = safeckpt.CheckpointManager(tmp_path / "run")
    manager.save(7, {"model": tensors, "epoch": 2, "betas": (0.9, 0.99)})
    manager.wait()
    saved = safe_load(manager.list()[-1].path)
    assert saved["epoch"] == 2 and saved["betas"] == (0.9, 0.99) and torch.equal(saved["model"]["a"], tensors["a"])


def test_malicious_files_are_refused_and_never_run(tmp_path):
    from tests.ops.malicious_corpus import make_corpus, malicious_torch_file

    canary = tmp_path / "ran"
    malicious_torch_file(tmp_path / "evil.pt", canary)
    with pytest.raises(errors.UnsafeFileError, match="refusing to load.*malicious"):
        safe_load(tmp_path / "evil.pt")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pytorch_model.bin").write_bytes((tmp_path / "evil.pt").read_bytes())
    with pytest.raises(errors.UnsafeFileError):  # a model folder: the file it opens is scanned
        safe_load(tmp_path / "model")
    corpus = make_corpus(tmp_path / "corpus")
    for item in corpus:
        with pytest.raises(errors.UnsafeFileError):
            safe_load(item.path)
    assert len(corpus) > 10 and not canary.exists() and not any(item.canary.exists() for item in corpus)


def test_hostile_structure_gives_one_clear_error(tmp_path):
    torch.save({"w": torch.arange(8.0)}, tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as source, zipfile.ZipFile(tmp_path / "short.pt", "w") as out:
        for info in source.infolist():
            data = source.read(info)
            out.writestr(info.filename, data[:16] if "/data/" in info.filename else data)
    with pytest.raises(errors.SafeckptError, match="short.pt"):
        safe_load(tmp_path / "short.pt")
