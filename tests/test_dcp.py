"""safeckpt as the storage layer of torch.distributed.checkpoint: real dcp.save/dcp.load, gloo on the CPU."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from torch.distributed.checkpoint.api import CheckpointException

import safeckpt
import safeckpt.torch
from safeckpt.torch.distributed import SafeStorageReader, SafeStorageWriter

from tests import dcp_worker
from tests.files import tensor_bytes


def single_state() -> dict:
    torch.manual_seed(0)
    return {"w": torch.randn(6, 4), "b": torch.arange(5, dtype=torch.bfloat16),
            "nested": {"step": 7, "betas": (0.9, 0.99), "array": np.arange(3), "big": 2 ** 70},
            "name": "run-1"}


def empty_like(state: dict) -> dict:
    return {"w": torch.zeros(6, 4), "b": torch.zeros(5, dtype=torch.bfloat16),
            "nested": {"step": 0, "betas": None, "array": None, "big": None}, "name": None}


def test_a_single_process_save_and_load_round_trips(tmp_path):
    state = single_state()
    dcp.save(state, storage_writer=SafeStorageWriter(tmp_path / "ckpt"))
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["dcp.json", "manifest.json", "rank-00000.safetensors"], names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    for name in names:
        assert safeckpt.scan(tmp_path / "ckpt" / name).verdict == "safe"
    json.loads((tmp_path / "ckpt" / "dcp.json").read_text())
    loaded = empty_like(state)
    dcp.load(loaded, storage_reader=SafeStorageReader(tmp_path / "ckpt"))
    assert tensor_bytes(loaded["w"]) == tensor_bytes(state["w"]) and torch.equal(loaded["b"], state["b"])
    nested = loaded["nested"]
    assert nested["step"] == 7 and nested["betas"] == (0.9, 0.99) and type(nested["betas"]) is tuple
    assert nested["big"] == 2 ** 70 and np.array_equal(nested["array"], np.arange(3))
    assert loaded["name"] == "run-1"


def test_saving_again_replaces_the_checkpoint_whole(tmp_path):
    state = single_state()
    dcp.save(state, storage_writer=SafeStorageWriter(tmp_path / "ckpt"))
    state["w"] += 1
    dcp.save(state, storage_writer=SafeStorageWriter(tmp_path / "ckpt"))
    loaded = empty_like(state)
    dcp.load(loaded, storage_reader=SafeStorageReader(tmp_path / "ckpt"))
    assert torch.equal(loaded["w"], state["w"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_damaged_file_is_refused_before_it_is_used(tmp_path):
    dcp.save(single_state(), storage_writer=SafeStorageWriter(tmp_path / "ckpt"))
    data = bytearray((tmp_path / "ckpt" / "rank-00000.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "ckpt" / "rank-00000.safetensors").write_bytes(bytes(data))
    # DCP raises a CheckpointException (a BaseException) holding each rank's error
    with pytest.raises(CheckpointException, match=r"IntegrityError: .*rank-00000.safetensors: tensor 'b@0'"):
        dcp.load(empty_like(single_state()), storage_reader=SafeStorageReader(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "dcp.json").write_text('{"format": "safeckpt-dcp", "version": 1, "tensors": []}')
    with pytest.raises(CheckpointException, match="dcp.json: is 55 bytes but the manifest records"):
        dcp.load(empty_like(single_state()), storage_reader=SafeStorageReader(tmp_path / "ckpt"))
    with pytest.raises(CheckpointException, match="not a committed distributed checkpoint"):
        dcp.load(empty_like(single_state()), storage_reader=SafeStorageReader(tmp_path / "nothing"))


# --- across processes ----------------------------------------------------------------------

ROWS, COLS = 8, 6


def full_tensor(seed: int = 0) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) * (seed + 1)


def _placement(name: str):
    from torch.distributed.tensor import Replicate, Shard

    return {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}[name]


def save_sharded(rank: int, world_size: int, path: str) -> None:
    """w and v as Shard(0) DTensors over the ranks, a plain tensor and an int."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {"w": distribute_tensor(full_tensor(), mesh, [Shard(0)]),
             "v": distribute_tensor(full_tensor(1)[:, :4].contiguous(), mesh, [Shard(0)]),
             "plain": torch.arange(3.0), "epoch": 4}
    dcp.save(state, storage_writer=SafeStorageWriter(path))


def load_sharded(rank: int, world_size: int, path: str, placement: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from safeckpt.training import dcp as storage

    read = []  # the bytes of every chunk this rank checks (and copies from): what it reads
    check = storage._RankFile.check

    def counting(self, name):
        if name not in self.checked:
            read.append(self.file.info(name).nbytes)
        return check(self, name)

    storage._RankFile.check = counting
    mesh = init_device_mesh("cpu", (world_size,))
    state = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [_placement(placement)]),
             "v": distribute_tensor(torch.zeros(ROWS, 4), mesh, [_placement(placement)]),
             "plain": torch.zeros(3), "epoch": 0}
    dcp.load(state, storage_reader=SafeStorageReader(path))
    # numpy copies: torch tensors would travel to the parent as shared memory of a process that exits
    return {"w": state["w"].full_tensor().numpy().copy(), "v": state["v"].full_tensor().numpy().copy(),
            "plain": state["plain"].numpy().copy(), "epoch": state["epoch"], "read": sum(read)}


@pytest.mark.slow
def test_dtensors_saved_by_two_ranks_load_at_any_world_size_and_placement(tmp_path):
    path = str(tmp_path / "ckpt")
    dcp_worker.run(2, save_sharded, path)
    assert sorted(os.listdir(path)) == ["dcp.json", "manifest.json", "rank-00000.safetensors",
                                        "rank-00001.safetensors"]
    expected = {"w": full_tensor(), "v": full_tensor(1)[:, :4], "plain": torch.arange(3.0), "epoch": 4}
    for placement in ("shard0", "shard1", "replicate"):
        for got in dcp_worker.run(2, load_sharded, path, placement):
            for key in ("w", "v", "plain"):
                assert np.array_equal(got[key], expected[key].numpy()), (placement, key)
            assert got["epoch"] == 4
    alone = {"w": torch.zeros(ROWS, COLS), "v": torch.zeros(ROWS, 4), "plain": torch.zeros(3), "epoch": 0}
    dcp.load(alone, storage_reader=SafeStorageReader(path))  # world size 1, no process group
    assert torch.equal(alone["w"], expected["w"]) and torch.equal(alone["v"], expected["v"])
    assert alone["epoch"] == 4



def test_a_distributed_checkpoint_is_a_source_for_every_tool(tmp_path):
    from safeckpt.torch.distributed import consolidate

    path = str(tmp_path / "ckpt")
    dcp_worker.run(2, save_sharded, path)
    with safeckpt.open_source(path) as source:
        assert source.format == "safeckpt-dcp" and sorted(source.keys()) == ["plain", "v", "w"]
        assert np.array_equal(source.read("w"), full_tensor().numpy())
        assert source.tree["values"]["epoch"]["tree"] == 4
    report = consolidate(path, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["model.safetensors"]
    model = safeckpt.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(model["w"], full_tensor()) and torch.equal(model["v"], full_tensor(1)[:, :4])
    assert report.tensors == 3
    from tests.cli.runner import invoke

    result = invoke("convert", path, str(tmp_path / "cli"), "--shard-size", "100B", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["outputs"]) == 3  # one shard a tensor, with an index
    assert invoke("inspect", path).exit_code == 0
    assert safeckpt.verify(path).ok
    data = bytearray(open(os.path.join(path, "rank-00001.safetensors"), "rb").read())
    data[-3] ^= 1
    open(os.path.join(path, "rank-00001.safetensors"), "wb").write(bytes(data))
    report = safeckpt.verify(path)
    assert not report.ok and "rank-00001.safetensors" in str(report.to_dict())


# --- FSDP2: saved at world size 4, resumed at 2 -------------------------------------------------

def fsdp_run(rank: int, world_size: int, path: str, steps: int, save_at: int, resume: bool) -> list:
    """A 3-layer MLP under fully_shard + AdamW on one fixed batch; returns the loss before each step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)
    start = 0
    if resume:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optimizer_state, "step": 0}
        dcp.load(state, storage_reader=SafeStorageReader(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = state["step"]
    losses = []
    for step in range(start, steps):
        if step == save_at and not resume:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optimizer_state, "step": step},
                     storage_writer=SafeStorageWriter(path))
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


@pytest.mark.slow
def test_fsdp2_saved_at_four_ranks_resumes_at_two_where_it_stopped(tmp_path):
    path = str(tmp_path / "ckpt")
    straight = dcp_worker.run(4, fsdp_run, path, 6, 3, False)[0]
    optimizer_keys = json.loads((tmp_path / "ckpt" / "dcp.json").read_text())["tensors"]
    assert any(key.startswith("optim.state.") and key.endswith(".exp_avg") for key in optimizer_keys)  # by FQN
    resumed = dcp_worker.run(2, fsdp_run, path, 6, 3, True)
    for losses in resumed:
        assert losses[0] == straight[3]  # the restored weights are the saved ones, bit for bit
        assert np.allclose(losses, straight[3:], rtol=1e-5, atol=0)  # and Adam's moments carried on


def test_async_save_writes_the_same_checkpoint(tmp_path):
    state = single_state()
    future = dcp.async_save(state, storage_writer=SafeStorageWriter(tmp_path / "ckpt"))
    future.result()
    loaded = empty_like(state)
    dcp.load(loaded, storage_reader=SafeStorageReader(tmp_path / "ckpt"))
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"]["betas"] == (0.9, 0.99)


class FailingWriter(SafeStorageWriter):
    """Rank 1 runs out of space halfway through its file."""

    def write_data(self, plan, planner):
        if plan.storage_data["rank"] == 1:
            import errno

            with open(os.path.join(plan.storage_data["staging"], "rank-00001.safetensors"), "wb") as f:
                f.write(b"\\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_data(plan, planner)


def save_failing(rank: int, world_size: int, path: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {"w": distribute_tensor(full_tensor(7), mesh, [Shard(0)])}
    try:
        dcp.save(state, storage_writer=FailingWriter(path))
    except BaseException as exc:  # noqa: BLE001 - every rank must see the failure
        return type(exc).__name__ + ": " + str(exc)[:2000]
    return "saved"


@pytest.mark.slow
def test_a_rank_that_fails_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = str(tmp_path / "ckpt")
    dcp_worker.run(2, save_sharded, path)
    outcomes = dcp_worker.run(2, save_failing, path)
    assert all("No space left on device" in outcome for outcome in outcomes), outcomes  # every rank raises
    alone = {"w": torch.zeros(ROWS, COLS), "v": torch.zeros(ROWS, 4), "plain": torch.zeros(3), "epoch": 0}
    dcp.load(alone, storage_reader=SafeStorageReader(path))
    assert torch.equal(alone["w"], full_tensor())  # the previous checkpoint, intact
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the failed save's staging: never listed as the checkpoint
    dcp_worker.run(2, save_sharded, path)  # the next save clears it
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_dcp_s_own_metadata_pickle_reads_as_data_with_dtypes_and_storage(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "step": 5}
    dcp.save(state, checkpoint_id=str(tmp_path / "std"))  # DCP's own FileSystemWriter: a pickled .metadata
    with safeckpt.open_source(tmp_path / "std" / ".metadata") as source:
        tree = source.tree
    assert safeckpt.scan(tmp_path / "std" / ".metadata").verdict == "safe"
    properties = tree["state_dict_metadata"]["b"]["properties"]
    assert properties["dtype"] == {"__torch__": "torch.bfloat16"} and properties["requires_grad"] is False
    assert tree["state_dict_metadata"]["w"]["chunks"] == [{"offsets": [0, 0], "sizes": [3, 4]}]
    storage = tree["storage_data"]
    assert set(storage) == {"w,0,0", "b,0", "step,None"}  # MetadataIndex keys kept (hashable records)
    assert all(entry["relative_path"].endswith(".distcp") for entry in storage.values())


def save_with_dcp_s_own_writer(rank: int, world_size: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {"w": distribute_tensor(full_tensor(), mesh, [Shard(0)]), "b": torch.arange(5, dtype=torch.bfloat16),
             "epoch": 3, "config": {"lr": 0.1, "betas": (0.9, 0.99)}}
    dcp.save(state, checkpoint_id=path)


@pytest.mark.slow
def test_a_checkpoint_of_dcp_s_own_format_is_read_scanned_and_converted_without_running_it(tmp_path):
    from tests.cli.runner import invoke
    from tests.ops.malicious_corpus import malicious_torch_file

    path = str(tmp_path / "dcp")
    dcp_worker.run(2, save_with_dcp_s_own_writer, path)
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    report = safeckpt.scan(path)
    assert report.verdict == "safe", [(r.path, r.findings) for r in report.files]
    with safeckpt.open_source(path) as source:
        assert source.format == "torch-dcp" and sorted(source.keys()) == ["b", "w"]
        assert np.array_equal(source.read("w"), full_tensor().numpy())
        assert source.tree["values"] == {"epoch": 3, "config.lr": 0.1, "config.betas": [0.9, 0.99]}
    result = invoke("convert", path, str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    model = safeckpt.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(model["w"], full_tensor()) and torch.equal(model["b"], torch.arange(5, dtype=torch.bfloat16))
    # a pickle that runs code, slipped in among the items of a .distcp file, is found
    canary = tmp_path / "ran"
    malicious_torch_file(tmp_path / "evil.pt", canary)
    distcp = os.path.join(path, "__1_0.distcp")
    with open(distcp, "rb") as f:
        items = f.read()
    with open(distcp, "wb") as f:
        f.write((tmp_path / "evil.pt").read_bytes() + items)
    assert safeckpt.scan(path).verdict == "malicious" and not canary.exists()


class DyingWriter(SafeStorageWriter):
    """Rank 1 is SIGKILLed halfway through writing its file."""

    def write_data(self, plan, planner):
        if plan.storage_data["rank"] == 1:
            import signal

            with open(os.path.join(plan.storage_data["staging"], "rank-00001.safetensors"), "wb") as f:
                f.write(b"half a file")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write_data(plan, planner)


def save_dying(rank: int, world_size: int, path: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    try:
        dcp.save({"w": distribute_tensor(full_tensor(9), mesh, [Shard(0)])}, storage_writer=DyingWriter(path))
    except BaseException as exc:  # noqa: BLE001 - the surviving rank must see the failure
        return type(exc).__name__
    return "saved"


@pytest.mark.slow
def test_a_rank_killed_mid_save_commits_nothing(tmp_path):
    path = str(tmp_path / "ckpt")
    dcp_worker.run(2, save_sharded, path)
    outcomes = dcp_worker.run(2, save_dying, path, dies=(1,))
    assert outcomes[1] is None and outcomes[0] != "saved", outcomes  # the survivor's save raised
    alone = {"w": torch.zeros(ROWS, COLS), "v": torch.zeros(ROWS, 4), "plain": torch.zeros(3), "epoch": 0}
    dcp.load(alone, storage_reader=SafeStorageReader(path))
    assert torch.equal(alone["w"], full_tensor()) and safeckpt.verify(path).ok  # the previous one, whole
    assert sorted(os.listdir(tmp_path))[0].startswith(".tmp-ckpt-")  # the dead save: never under the name


@pytest.mark.slow
def test_saved_at_four_ranks_loads_at_one_two_and_four_in_every_placement(tmp_path):
    path = str(tmp_path / "ckpt")
    dcp_worker.run(4, save_sharded, path)
    expected = {"w": full_tensor(), "v": full_tensor(1)[:, :4], "plain": torch.arange(3.0)}
    shard_bytes = (ROWS * COLS + ROWS * 4) * 4 // 4  # one rank's quarter of w and v, as saved
    for world_size in (2, 4):
        for placement in ("shard0", "shard1", "replicate"):
            for got in dcp_worker.run(world_size, load_sharded, path, placement):
                for key, value in expected.items():
                    assert np.array_equal(got[key], value.numpy()), (world_size, placement, key)
                assert got["epoch"] == 4
                if placement == "shard0":  # rows to rows: each rank reads the chunks it holds (and `plain`)
                    own = shard_bytes * 4 // world_size
                    assert own <= got["read"] <= 1.1 * own + 3 * 4, (world_size, got["read"])
    alone = {"w": torch.zeros(ROWS, COLS), "v": torch.zeros(ROWS, 4), "plain": torch.zeros(3), "epoch": 0}
    dcp.load(alone, storage_reader=SafeStorageReader(path))
    assert torch.equal(alone["w"], expected["w"]) and alone["epoch"] == 4


def test_a_rank_writes_several_files_at_once_with_thread_count(tmp_path):
    torch.manual_seed(1)
    state = {f"layer{k}": torch.randn(64 + k, 32) for k in range(7)}
    state["value"] = {"step": 3, "array": np.arange(4)}
    dcp.save(state, storage_writer=SafeStorageWriter(tmp_path / "ckpt", thread_count=3))
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["dcp.json", "manifest.json", "rank-00000-000.safetensors", "rank-00000-001.safetensors",
                     "rank-00000-002.safetensors"], names
    sizes = [os.path.getsize(tmp_path / "ckpt" / name) for name in names[2:]]
    assert max(sizes) < 1.5 * min(sizes)  # balanced by bytes
    loaded = {f"layer{k}": torch.zeros(64 + k, 32) for k in range(7)}
    loaded["value"] = {"step": 0, "array": None}
    dcp.load(loaded, storage_reader=SafeStorageReader(tmp_path / "ckpt"))
    assert all(torch.equal(loaded[f"layer{k}"], state[f"layer{k}"]) for k in range(7))
    assert loaded["value"]["step"] == 3 and np.array_equal(loaded["value"]["array"], np.arange(4))
    assert safeckpt.verify(str(tmp_path / "ckpt")).ok
    with pytest.raises(safeckpt.SafeckptError, match="thread_count must be an integer from 1 to 64"):
        SafeStorageWriter(tmp_path / "other", thread_count=0)
