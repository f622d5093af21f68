"""training_state / restore_training_state: a run stopped halfway, stored without pickle and
resumed in a new process, ends bit-identical to the run that never stopped."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
stock_load_file = pytest.importorskip("safetensors.torch").load_file

from safeckpt.errors import StateFormatError, UnsupportedStateError  # noqa: E402
from safeckpt.torch import restore_training_state, training_state  # noqa: E402
from safeckpt.training import split_state  # noqa: E402

from tests.files import tensor_bytes  # noqa: E402
from tests.training import resume_child as run  # noqa: E402
from tests.training.trees import assert_same, through_files  # noqa: E402

CHILD = Path(__file__).parent / "resume_child.py"
HALF = run.STEPS // 2


@pytest.fixture
def settled():
    """Deterministic single-threaded torch for the test; global RNGs and settings put back after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    run.settle()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def uninterrupted(config: str):
    run.seed_everything(1234)
    parts = run.build(config)
    return parts, run.train(parts, run.make_data(), run.STEPS)


def first_half(config: str, directory: Path) -> list[float]:
    run.seed_everything(1234)
    parts = run.build(config)
    losses = run.train(parts, run.make_data(), HALF)
    directory.mkdir(exist_ok=True)
    run.save_state(training_state(*parts, extra={"done": HALF}), directory)
    return losses


# --- the resume, in a new process --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", run.CONFIGS)
def test_a_run_resumed_in_a_new_process_is_bit_identical(config, tmp_path, settled):
    full, full_losses = uninterrupted(config)
    full_state = training_state(*full, extra={"done": run.STEPS})
    assert first_half(config, tmp_path / "checkpoint") == full_losses[:HALF]

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, str(CHILD), config, str(tmp_path / "checkpoint"), str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr

    assert json.loads((out / "losses.json").read_text()) == full_losses[HALF:]
    weights = stock_load_file(out / "weights.safetensors")  # the stock library reads them
    expected = full[0].state_dict()
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert tensor_bytes(weights[name]) == tensor_bytes(tensor), name
    # Optimizer moments and step counts, scheduler, scaler and every RNG end where the full run's did.
    assert_same(run.load_state(out), full_state)
    if config == "sgd_scaler":
        assert full[3].get_scale() > 2.0 ** 8  # the scale grew during the run, so its state was live


@pytest.mark.parametrize("left_out", [None, "python", "numpy", "torch"])
def test_every_rng_is_restored_and_every_one_matters(left_out, tmp_path, settled):
    _, full_losses = uninterrupted("adam")
    first_half("adam", tmp_path)
    random.random(), np.random.random(), torch.rand(1)  # the process moves on
    state = run.load_state(tmp_path)
    if left_out:
        del state["rng"][left_out]
    parts = run.build("adam")
    extra = restore_training_state(state, *parts)
    assert extra == {"done": HALF}
    rest = run.train(parts, run.make_data(), run.STEPS - HALF)
    assert (rest == full_losses[HALF:]) is (left_out is None)


# --- the parts ---------------------------------------------------------------------

def test_optimizer_hyperparameters_of_every_type_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam([
        {"params": [model.weight], "name": "decay", "tags": ("a", "b"), "clip": None, "ratio": float("inf")},
        {"params": [model.bias], "lr": 0.5, "betas": (0.5, 0.75), "weight_decay": 0.0, "frozen": False},
    ], lr=0.1, amsgrad=True)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(3)).pow(2).sum().backward()
        optimizer.step()
    state = through_files(training_state(model, optimizer), tmp_path)

    fresh_model = torch.nn.Linear(3, 2)
    fresh = torch.optim.Adam([{"params": [fresh_model.weight]}, {"params": [fresh_model.bias]}], lr=9.0)
    restore_training_state(state, fresh_model, fresh)
    assert_same(fresh.state_dict(), optimizer.state_dict())
    assert type(fresh.state_dict()["state"][0]["step"]) is torch.Tensor  # the step counter stays a tensor
    assert fresh.param_groups[0]["tags"] == ("a", "b") and fresh.param_groups[0]["ratio"] == float("inf")


def test_lbfgs_state_with_number_counters_and_tensor_lists_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=3)
    inputs, targets = torch.randn(16, 4), torch.randn(16, 1)

    def closure_for(model, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            return loss
        return closure

    optimizer.step(closure_for(model, optimizer))
    state = through_files(training_state(model, optimizer), tmp_path)
    lbfgs = state["optimizer"]["state"][0]
    assert type(lbfgs["n_iter"]) is int and type(lbfgs["old_dirs"]) is list and lbfgs["old_dirs"]

    fresh_model = torch.nn.Linear(4, 1)
    fresh = torch.optim.LBFGS(fresh_model.parameters(), lr=0.5, history_size=3)
    restore_training_state(state, fresh_model, fresh)
    assert_same(fresh.state_dict(), optimizer.state_dict())
    optimizer.step(closure_for(model, optimizer))
    fresh.step(closure_for(fresh_model, fresh))
    assert torch.equal(fresh_model.weight, model.weight)


def test_lambda_schedulers_keep_their_functions_out_of_the_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = through_files(training_state(model, optimizer, scheduler), tmp_path)
    assert state["scheduler"]["lr_lambdas"] == [None]

    fresh_optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda epoch: 0.5 ** epoch)
    restore_training_state(state, model, fresh_optimizer, fresh)
    restore_training_state(state, model, fresh_optimizer, fresh)  # the state is not consumed by restoring
    assert fresh.last_epoch == 3 and fresh.get_last_lr() == [0.125]
    fresh_optimizer.step()
    fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == 0.0625


def test_a_function_in_the_state_is_refused_with_its_path():
    model = torch.nn.Linear(2, 1)
    state = training_state(model, extra={"schedule": {"warmup": lambda step: step / 100}})
    with pytest.raises(UnsupportedStateError, match=r"state\['extra'\]\['schedule'\]\['warmup'\]: .*never stored"):
        split_state(state)


def test_grad_scaler_state_round_trips(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        scaler.scale(model(torch.ones(2)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    state = through_files(training_state(model, optimizer, scaler=scaler), tmp_path)
    fresh = torch.amp.GradScaler("cpu")
    restore_training_state(state, model, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict() == {
        "scale": 4.0, "growth_factor": 3.0, "backoff_factor": 0.25, "growth_interval": 7, "_growth_tracker": 2}


def test_rng_states_come_back_with_cached_gaussians_and_user_generators(tmp_path, settled):
    random.seed(5)
    random.gauss(0, 1)  # leaves a cached second value
    np.random.seed(5)
    np.random.standard_normal()  # likewise
    generator = np.random.default_rng(11)
    generator.random(3)
    state = through_files(training_state(torch.nn.Linear(1, 1), extra={"generator": generator.bit_generator.state}),
                          tmp_path)
    expected = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.random(),
                torch.rand(3), generator.random(2))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    extra = restore_training_state(state, torch.nn.Linear(1, 1))
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = extra["generator"]  # a 128-bit PCG64 state, stored as tagged ints
    got = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.random(),
           torch.rand(3), resumed.random(2))
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4]) and np.array_equal(got[5], expected[5])


def test_restore_names_what_is_missing():
    model = torch.nn.Linear(2, 1)
    state = training_state(model)
    with pytest.raises(StateFormatError, match=r"no 'optimizer' part \(it holds: extra, model, rng\); pass optimizer=None"):
        restore_training_state(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(StateFormatError, match="expected the dict made by training_state"):
        restore_training_state([state], model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cuda_rng_states_without_cuda_warn_and_the_rest_is_restored():
    state = training_state(torch.nn.Linear(1, 1))
    state["rng"]["cuda"] = [torch.get_rng_state()]
    with pytest.warns(UserWarning, match="1 CUDA device.*not available"):
        restore_training_state(state, torch.nn.Linear(1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_states_are_captured_and_restored(tmp_path):
    torch.cuda.manual_seed_all(3)
    torch.rand(2, device="cuda")
    model = torch.nn.Linear(2, 1).cuda()
    state = through_files(training_state(model), tmp_path)
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(0)
    restore_training_state(state, model)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_through_the_checkpoint_manager(tmp_path, settled, async_save):
    """The README's loop: save with the manager, reopen it, restore into fresh objects, go on."""
    from safeckpt import CheckpointManager

    full_parts, full_losses = uninterrupted("adamw_cosine")
    run.seed_everything(1234)
    parts = run.build("adamw_cosine")
    data = run.make_data()
    losses = run.train(parts, data, HALF)
    with CheckpointManager(tmp_path / "ckpt", keep_last=2, async_save=async_save) as mgr:
        assert mgr.save(HALF, training_state(*parts, extra={"done": HALF}), metrics={"loss": losses[-1]})
        run.train(parts, data, 2)  # training goes on while the snapshot is written: must not leak in
    run.seed_everything(999)  # a fresh process would start from other RNG states
    fresh = run.build("adamw_cosine")
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert [info.step for info in mgr.list()] == [HALF]
        assert restore_training_state(mgr.restore("latest"), *fresh) == {"done": HALF}
    losses += run.train(fresh, data, run.STEPS - HALF)
    assert losses == full_losses
    for (name, a), b in zip(full_parts[0].state_dict().items(), fresh[0].state_dict().values()):
        assert tensor_bytes(a) == tensor_bytes(b), name
