"""CheckpointManager under a torch process group: real gloo ranks on the CPU, DCP underneath."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

import safeckpt
from safeckpt import CheckpointManager
from safeckpt.errors import CheckpointError

from tests import dcp_worker

ROWS, COLS = 8, 6


def full(seed: int) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) * (seed + 1)


def sharded_state(world_size: int, seed: int, placement: str = "shard0") -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    place = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}[placement]
    return {"model": {"w": distribute_tensor(full(seed), mesh, [place]),
                      "b": torch.full((3,), float(seed), dtype=torch.bfloat16)},
            "optim": {"param_groups": [{"lr": 0.1 * seed, "betas": (0.9, 0.99)}]},
            "step": seed}


def save_steps(rank: int, world_size: int, directory: str, steps: list, async_save: bool) -> dict:
    """Save `steps` (rank-dependent metrics: rank 0's must count); what list() says on this rank."""
    seen = []
    with CheckpointManager(directory, keep_last=2, keep_best=1, monitor="loss", async_save=async_save) as mgr:
        for step in steps:
            state = sharded_state(world_size, step)
            loss = {1: 0.5, 2: 0.9, 3: 0.8, 4: 0.7}.get(step, 1.0) + rank  # step 1 is best on rank 0
            assert mgr.save(step, state, metrics={"loss": loss})
            if async_save:  # save() copied the state: changing it now must not change the checkpoint
                state["model"]["w"].to_local().fill_(-1.0)
            seen.append([info.step for info in mgr.list()])
        mgr.wait()
        final = [(info.step, info.metrics["loss"]) for info in mgr.list()]
    return {"seen": seen, "final": final}


def restore_at(rank: int, world_size: int, directory: str, placement: str) -> dict:
    """Restore the latest step into this rank's sharding, and whole; numpy copies back to the parent."""
    with CheckpointManager(directory, keep_last=2) as mgr:
        target = sharded_state(world_size, 0, placement)
        restored = mgr.restore("latest", target=target)
        whole = mgr.restore("latest")
        steps = [info.step for info in mgr.list()]
    assert restored is target
    return {"w": restored["model"]["w"].full_tensor().numpy().copy(),
            "b": restored["model"]["b"].float().numpy().copy(), "step": restored["step"],
            "lr": restored["optim"]["param_groups"][0]["lr"], "whole_w": whole["model"]["w"].numpy().copy(),
            "betas": whole["optim"]["param_groups"][0]["betas"], "steps": steps}


def test_ranks_save_through_dcp_rank_zero_prunes_and_list_is_the_same_everywhere(tmp_path):
    directory = str(tmp_path / "ckpt")
    results = dcp_worker.run(2, save_steps, directory, [1, 2, 3, 4], False)
    assert results[0] == results[1]  # list() agrees on every rank, after every save
    assert results[0]["seen"] == [[1], [1, 2], [1, 2, 3], [1, 3, 4]]
    assert results[0]["final"] == [(1, 0.5), (3, 0.8), (4, 0.7)]  # rank 0's metrics; best + last two
    step = tmp_path / "ckpt" / "step-00000004"
    assert sorted(os.listdir(step)) == ["dcp.json", "manifest.json", "rank-00000.safetensors",
                                        "rank-00001.safetensors"]
    assert not [name for name in os.listdir(directory) if name.startswith(".tmp-")]
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["monitor"] == {"name": "loss", "mode": "min"}
    assert safeckpt.scan(step).verdict == "safe" and safeckpt.verify(str(step)).ok

    # one process, no process group: the same listing, the whole state, or into plain tensors
    with CheckpointManager(directory, keep_last=2) as mgr:
        assert [info.step for info in mgr.list()] == [1, 3, 4]
        assert mgr.verify().ok
        whole = mgr.restore("best")
        assert torch.equal(whole["model"]["w"], full(1)) and whole["step"] == 1
        assert whole["model"]["b"].dtype == torch.bfloat16 and whole["optim"]["param_groups"][0]["lr"] == 0.1
        target = {"model": {"w": torch.zeros(ROWS, COLS), "b": torch.zeros(3, dtype=torch.bfloat16)},
                  "optim": {"param_groups": [{"lr": 0.0, "betas": None}]}, "step": 0}
        assert mgr.restore(4, target=target) is target
        assert torch.equal(target["model"]["w"], full(4)) and target["step"] == 4
        assert target["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)


@pytest.mark.slow
def test_a_checkpoint_saved_by_four_ranks_restores_at_two_in_every_placement(tmp_path):
    directory = str(tmp_path / "ckpt")
    dcp_worker.run(4, save_steps, directory, [1, 2], False)
    for placement in ("shard0", "shard1", "replicate"):
        for got in dcp_worker.run(2, restore_at, directory, placement):
            assert np.array_equal(got["w"], full(2).numpy()) and np.array_equal(got["whole_w"], full(2).numpy())
            assert got["step"] == 2 and got["lr"] == pytest.approx(0.2) and got["betas"] == (0.9, 0.99)
            assert np.array_equal(got["b"], np.full(3, 2.0)) and got["steps"] == [1, 2]


@pytest.mark.slow
def test_async_saves_snapshot_each_rank_and_commit_when_all_are_done(tmp_path):
    directory = str(tmp_path / "ckpt")
    results = dcp_worker.run(2, save_steps, directory, [1, 2, 3], True)
    assert results[0]["final"] == results[1]["final"] == [(1, 0.5), (2, 0.9), (3, 0.8)]
    for step in (1, 2, 3):
        whole = CheckpointManager(directory, read_only=True).restore(step)
        assert torch.equal(whole["model"]["w"], full(step))  # the state as save() saw it, not the -1s after


def save_with_a_full_disk(rank: int, world_size: int, directory: str) -> str:
    from safeckpt.training import dcp as storage

    with CheckpointManager(directory, keep_last=3) as mgr:
        mgr.save(1, sharded_state(world_size, 1))
        if rank == 1:
            def full_disk(path, part):
                with open(path, "xb") as f:
                    f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")

            storage._write_rank_file = full_disk
        try:
            mgr.save(2, sharded_state(world_size, 2))
        except CheckpointError as exc:
            outcome = str(exc)
        else:
            outcome = "saved"
        storage._write_rank_file = _write_rank_file
        assert [info.step for info in mgr.list()] == [1]
        assert mgr.save(2, sharded_state(world_size, 2))  # the same step saves once there is room
        assert [info.step for info in mgr.list()] == [1, 2]
    return outcome


from safeckpt.training.dcp import _write_rank_file  # noqa: E402 - restored after the failure above


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_and_commits_nothing(tmp_path):
    directory = str(tmp_path / "ckpt")
    outcomes = dcp_worker.run(2, save_with_a_full_disk, directory)
    for outcome in outcomes:
        assert "cannot save step 2: rank 1: No space left on device (ENOSPC)" in outcome, outcome
        assert "nothing was committed" in outcome and "free disk space" in outcome
    assert sorted(os.listdir(directory)) == [".safeckpt.lock", "step-00000001", "step-00000002"]


def save_then_die(rank: int, world_size: int, directory: str, moment: str) -> str:
    import signal

    from safeckpt.training import dcp as storage

    with CheckpointManager(directory, keep_last=3) as mgr:
        mgr.save(1, sharded_state(world_size, 1))
        if rank == 1:
            write = storage._write_rank_file

            def dying(path, part):
                if moment == "before-writing":
                    os.kill(os.getpid(), signal.SIGKILL)
                with open(path, "xb") as f:
                    f.write(b"\0" * 64)
                    f.flush()
                    if moment == "mid-file":
                        os.kill(os.getpid(), signal.SIGKILL)
                os.unlink(path)
                entry = write(path, part)
                os.kill(os.getpid(), signal.SIGKILL)  # "written": the file is whole, the commit not yet done
                return entry

            storage._write_rank_file = dying
        try:
            mgr.save(2, sharded_state(world_size, 2))
        except BaseException as exc:  # noqa: BLE001 - the survivor must fail, not hang or commit
            return f"{type(exc).__name__}: {exc}"[:500]
    return "saved"


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before-writing", "mid-file", "written"])
def test_a_rank_killed_mid_save_commits_nothing_and_the_previous_step_restores(tmp_path, moment):
    directory = str(tmp_path / "ckpt")
    outcome = dcp_worker.run(2, save_then_die, directory, moment, dies=(1,))[0]
    assert outcome != "saved"
    with CheckpointManager(directory) as mgr:  # a new run: lists step 1 alone, and cleans the leftovers
        assert [info.step for info in mgr.list()] == [1]
        assert torch.equal(mgr.restore()["model"]["w"], full(1))
        assert mgr.verify().ok
    assert sorted(os.listdir(directory)) == [".safeckpt.lock", "step-00000001"]


def fsdp_with_manager(rank: int, world_size: int, directory: str, steps: int, save_at: int, resume: bool) -> list:
    """An MLP under fully_shard + AdamW saved and resumed by CheckpointManager; the loss before each step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)
    losses, start = [], 0
    with CheckpointManager(directory, keep_last=2) as mgr:
        if resume:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            state = mgr.restore("latest", target={"model": model_state, "optim": optimizer_state, "step": 0})
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            start = state["step"]
        for step in range(start, steps):
            if step == save_at and not resume:
                model_state, optimizer_state = get_state_dict(model, optimizer)
                mgr.save(step, {"model": model_state, "optim": optimizer_state, "step": step})
            loss = torch.nn.functional.mse_loss(model(x), y)
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return losses


@pytest.mark.slow
def test_fsdp2_saved_by_the_manager_at_four_ranks_resumes_at_two(tmp_path):
    directory = str(tmp_path / "ckpt")
    straight = dcp_worker.run(4, fsdp_with_manager, directory, 5, 2, False)[0]
    for losses in dcp_worker.run(2, fsdp_with_manager, directory, 5, 2, True):
        assert losses[0] == straight[2]
        assert np.allclose(losses, straight[2:], rtol=1e-5, atol=0)
