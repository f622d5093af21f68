"""SafeCheckpointIO inside the real Lightning Trainer and Fabric, on the CPU: no pickle on disk, exact resumes."""

from __future__ import annotations

import argparse
import os

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

from lightning.fabric import Fabric
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import safeckpt
from safeckpt import errors
from safeckpt.lightning import SafeCheckpointIO

from tests.lightning_models import TinyModel, data
from tests.training.trees import assert_same


def trainer(directory, max_steps: int, io=None, max_epochs=None, **checkpointing) -> Trainer:
    callback = ModelCheckpoint(dirpath=directory, **checkpointing) if checkpointing else \
        ModelCheckpoint(dirpath=directory, save_last=True)
    return Trainer(max_steps=max_steps, max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, plugins=[io] if io is not None else None, callbacks=[callback],
                   num_sanity_val_steps=0)


def weights(model) -> dict:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_model_checkpoint_writes_directories_with_no_pickle(tmp_path):
    seed_everything(0)
    model = TinyModel(namespace=argparse.Namespace(depth=2))
    run = trainer(tmp_path, 12, SafeCheckpointIO(), save_top_k=2, monitor="train_loss", save_last=True,
                  every_n_train_steps=3)
    run.fit(model, data())
    names = sorted(os.listdir(tmp_path))
    assert "last.ckpt" in names and len([n for n in names if n != "last.ckpt"]) == 2, names  # top-2 kept
    for name in names:
        assert os.path.isdir(tmp_path / name)
        assert sorted(os.listdir(tmp_path / name)) == ["manifest.json", "state.json", "tensors.safetensors"]
        for file in os.listdir(tmp_path / name):
            assert safeckpt.scan(tmp_path / name / file).verdict == "safe"
        assert safeckpt.verify(tmp_path / name / "tensors.safetensors").ok
    loaded = SafeCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert loaded["global_step"] == 12 and type(loaded["hyper_parameters"]["namespace"]) is argparse.Namespace
    group = loaded["optimizer_states"][0]["param_groups"][0]
    assert group["betas"] == (0.8, 0.95) and type(group["betas"]) is tuple
    assert all(type(key) is int for key in loaded["optimizer_states"][0]["state"])
    callback_state = next(value for key, value in loaded["callbacks"].items() if key.startswith("ModelCheckpoint"))
    assert isinstance(callback_state["best_model_score"], torch.Tensor)
    assert len(callback_state["best_k_models"]) == 2


def test_the_checkpoint_dict_round_trips_exactly(tmp_path):
    seed_everything(0)
    model = TinyModel()
    run = trainer(tmp_path / "run", 5, SafeCheckpointIO())
    run.fit(model, data())
    checkpoint = run._checkpoint_connector.dump_checkpoint()
    io = SafeCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "exact.ckpt")
    assert_same(io.load_checkpoint(tmp_path / "exact.ckpt"), checkpoint)


def resumed_weights(tmp_path, io_factory, dropout: float = 0.0, stop: int = 6, end: int = 12,
                    epochs: tuple = (None, None)) -> dict:
    """Train `stop` steps (or `epochs[0]` epochs), saving last.ckpt, then resume in a new Trainer
    from "last" to `end` steps (or `epochs[1]` epochs)."""
    seed_everything(0)
    first = trainer(tmp_path, stop, io_factory(), max_epochs=epochs[0])
    first.fit(TinyModel(dropout=dropout), data())
    seed_everything(123)  # a resumed process does not start where the first one stopped
    model = TinyModel(dropout=dropout)
    second = trainer(tmp_path, end, io_factory(), max_epochs=epochs[1])
    second.fit(model, data(), ckpt_path="last")
    return weights(model)


def test_a_resume_from_last_equals_the_same_resume_under_torch_checkpoint_io(tmp_path):
    ours = resumed_weights(tmp_path / "ours", SafeCheckpointIO)
    theirs = resumed_weights(tmp_path / "theirs", TorchCheckpointIO)
    assert_same(ours, theirs)


def test_with_capture_rng_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # Dropout draws from torch's generator at every step. The first run stops after a whole epoch:
    # stopped by max_steps, Lightning's own resume runs the epoch's end again (its loops, not the IO).
    def resumed(io_factory):
        return resumed_weights(tmp_path / str(len(os.listdir(tmp_path))), io_factory, dropout=0.5, stop=-1,
                               end=-1, epochs=(1, 2))

    seed_everything(0)
    model = TinyModel(dropout=0.5)
    trainer(tmp_path / "straight", -1, SafeCheckpointIO(), max_epochs=2).fit(model, data())
    assert_same(resumed(lambda: SafeCheckpointIO(capture_rng=True)), weights(model))
    with pytest.raises(AssertionError):  # without the generators, the resumed run draws other masks
        assert_same(resumed(SafeCheckpointIO), weights(model))


def test_async_checkpoint_io_wrapping_works(tmp_path):
    seed_everything(0)
    model = TinyModel()
    run = trainer(tmp_path, 6, AsyncCheckpointIO(SafeCheckpointIO()), save_top_k=-1, every_n_train_steps=2)
    run.fit(model, data())
    names = sorted(os.listdir(tmp_path))
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"], names
    assert SafeCheckpointIO().load_checkpoint(tmp_path / names[-1])["global_step"] == 6


def test_save_checkpoint_replaces_an_existing_checkpoint_only_when_complete(tmp_path):
    io = SafeCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, tmp_path / "last.ckpt")
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, tmp_path / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the old one and every temporary are gone
    with pytest.raises(errors.UnsupportedStateError, match=r"state\['bad'\]"):
        io.save_checkpoint({"global_step": 3, "bad": lambda: 1}, tmp_path / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2 and os.listdir(tmp_path) == ["last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})


def test_a_save_cleans_what_a_killed_save_of_the_same_name_left(tmp_path):
    stale = tmp_path / ".tmp-last.ckpt-0123456789ab"
    stale.mkdir()
    (stale / "tensors.safetensors").write_bytes(b"half a file")
    other = tmp_path / ".tmp-epoch=1.ckpt-0123456789ab"  # another name's: not ours to judge now
    other.mkdir()
    SafeCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert sorted(os.listdir(tmp_path)) == [".tmp-epoch=1.ckpt-0123456789ab", "last.ckpt"]


def test_remove_and_load_errors(tmp_path):
    io = SafeCheckpointIO()
    io.save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "a.ckpt")
    torch.save([torch.ones(1)], tmp_path / "old.ckpt")
    with pytest.raises(errors.CheckpointError, match="holds a list, not a checkpoint dict"):
        io.load_checkpoint(tmp_path / "old.ckpt")
    io.remove_checkpoint(tmp_path / "old.ckpt")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine.ckpt").mkdir()
    (tmp_path / "mine.ckpt" / "notes.txt").write_text("not ours")
    (tmp_path / "mine.ckpt" / "state.json").write_text("{}")  # a save that died before its manifest
    io.remove_checkpoint(tmp_path / "mine.ckpt")
    assert os.listdir(tmp_path / "mine.ckpt") == ["notes.txt"]  # what we did not write is never deleted


def test_a_damaged_checkpoint_is_refused(tmp_path):
    io = SafeCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.arange(100.0)}, tmp_path / "a.ckpt")
    tensors = tmp_path / "a.ckpt" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(data)
    with pytest.raises(errors.IntegrityError):
        io.load_checkpoint(tmp_path / "a.ckpt")


def test_fabric_save_and_load_round_trip(tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[SafeCheckpointIO()])
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    fabric.save(tmp_path / "state.ckpt", {"model": model, "optimizer": optimizer, "epoch": 3})
    expected = weights(model)
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    fresh, fresh_optimizer = fabric.setup(fresh, fresh_optimizer)
    state = {"model": fresh, "optimizer": fresh_optimizer}
    remainder = fabric.load(tmp_path / "state.ckpt", state)
    assert remainder == {"epoch": 3}
    assert_same(weights(fresh), expected)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_load_from_checkpoint_builds_the_module_from_its_hyperparameters(tmp_path):
    from safeckpt.lightning import load_from_checkpoint

    seed_everything(0)
    model = TinyModel(width=6, lr=0.02, namespace=argparse.Namespace(depth=3))
    trainer(tmp_path, 4, SafeCheckpointIO()).fit(model, data())
    loaded = load_from_checkpoint(TinyModel, tmp_path / "last.ckpt")
    assert type(loaded) is TinyModel and loaded.hparams.width == 6 and loaded.hparams.lr == 0.02
    assert vars(loaded.hparams.namespace) == {"depth": 3}
    assert_same(weights(loaded), weights(model))
    assert load_from_checkpoint(TinyModel, tmp_path / "last.ckpt", lr=0.5).hparams.lr == 0.5


def test_load_from_checkpoint_never_imports_an_instantiator_named_in_the_file(tmp_path):
    from safeckpt.lightning import load_from_checkpoint

    canary = tmp_path / "ran"
    io = SafeCheckpointIO()
    io.save_checkpoint({"global_step": 0, "state_dict": TinyModel().state_dict(),
                        "hyper_parameters": {"_instantiator": "os.system", "width": f"; touch {canary}"}},
                       tmp_path / "cli.ckpt")
    with pytest.raises(errors.UnsafeFileError, match="never imports a name read from a file"):
        load_from_checkpoint(TinyModel, tmp_path / "cli.ckpt")
    assert not canary.exists()


def test_verify_checks_each_lightning_checkpoint_of_a_folder_against_its_manifest(tmp_path):
    io = SafeCheckpointIO()
    for step in (1, 2):
        io.save_checkpoint({"global_step": step, "w": torch.arange(1000.0) * step}, tmp_path / f"step={step}.ckpt")
    report = safeckpt.verify(tmp_path)
    assert report.ok and [os.path.basename(child.path) for child in report.children] == ["step=1.ckpt",
                                                                                        "step=2.ckpt"]
    assert all(child.kind == "checkpoint" and child.hashes == "verified" for child in report.children)
    tensors = tmp_path / "step=2.ckpt" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-8] ^= 1
    tensors.write_bytes(data)
    report = safeckpt.verify(tmp_path)
    assert not report.ok and report.children[0].ok and not report.children[1].ok
    assert "step=2.ckpt" in report.children[1].problems[0] and "'w'" in report.children[1].problems[0]


KILLED_RUN = """
import os, signal, sys
from lightning.pytorch import Callback, seed_everything
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safeckpt.lightning import SafeCheckpointIO
from tests.lightning_models import TinyModel, data
from tests.test_lightning import trainer

class KillAfter(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 7:  # last.ckpt holds step 6: the process dies mid-epoch, unannounced
            os.kill(os.getpid(), signal.SIGKILL)

seed_everything(0)
io = SafeCheckpointIO() if sys.argv[2] == "safe" else TorchCheckpointIO()
run = trainer(sys.argv[1], 12, io, save_last=True, every_n_train_steps=3)
run.callbacks.append(KillAfter())
run.fit(TinyModel(), data())
"""


@pytest.mark.slow
def test_a_killed_run_resumes_from_last_as_under_torch_checkpoint_io(tmp_path):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    resumed = {}
    for kind, io_factory in (("safe", SafeCheckpointIO), ("torch", TorchCheckpointIO)):
        directory = tmp_path / kind
        child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(directory), kind], cwd=root,
                               capture_output=True, text=True, timeout=300)
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        assert "last.ckpt" in os.listdir(directory)
        seed_everything(123)
        model = TinyModel()
        trainer(directory, 12, io_factory(), save_last=True, every_n_train_steps=3).fit(model, data(),
                                                                                         ckpt_path="last")
        resumed[kind] = weights(model)
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path / "safe"))
    assert_same(resumed["safe"], resumed["torch"])


def test_map_location_moves_tensors_as_torch_load_would(tmp_path):
    io = SafeCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(2), "nested": [{"b": torch.zeros(1)}]}, tmp_path / "a.ckpt")
    moved = []

    def keep(storage, location):  # torch.load's form: a function of (storage, location)
        moved.append(location)
        return storage

    loaded = io.load_checkpoint(tmp_path / "a.ckpt", map_location=keep)
    assert moved == ["cpu", "cpu"] and torch.equal(loaded["w"], torch.ones(2))
    assert io.load_checkpoint(tmp_path / "a.ckpt", map_location={"cpu": "meta"})["w"].is_meta
    assert io.load_checkpoint(tmp_path / "a.ckpt", map_location=torch.device("meta"))["w"].is_meta
    assert io.load_checkpoint(tmp_path / "a.ckpt", map_location="cpu")["w"].device.type == "cpu"


def test_a_run_begun_under_torch_checkpoint_io_resumes_from_its_pickled_ckpt(tmp_path):
    # the first half under Lightning's default IO (a pickle), the second under ours: as if all torch
    seed_everything(0)
    trainer(tmp_path / "old", 6, TorchCheckpointIO()).fit(TinyModel(), data())
    pickled = tmp_path / "old" / "last.ckpt"
    assert os.path.isfile(pickled)
    resumed = {}
    for kind, io in (("safe", SafeCheckpointIO()), ("torch", TorchCheckpointIO())):
        seed_everything(123)
        model = TinyModel()
        trainer(tmp_path / kind, 12, io).fit(model, data(), ckpt_path=str(pickled))
        resumed[kind] = weights(model)
    assert_same(resumed["safe"], resumed["torch"])
    assert os.path.isdir(tmp_path / "safe" / "last.ckpt")  # and from there on, no pickle


def test_a_pickled_ckpt_loads_as_torch_would_with_its_namespace(tmp_path):
    from safeckpt.lightning import load_from_checkpoint

    seed_everything(0)
    model = TinyModel(width=6, namespace=argparse.Namespace(depth=3))
    trainer(tmp_path, 4, TorchCheckpointIO()).fit(model, data())
    pickled = tmp_path / "last.ckpt"
    with pytest.raises(Exception, match="Unsupported global"):  # what Lightning's default load meets
        torch.load(pickled, weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        expected = torch.load(pickled, weights_only=True)
    assert_same(SafeCheckpointIO().load_checkpoint(pickled), expected)
    loaded = load_from_checkpoint(TinyModel, pickled)
    assert loaded.hparams.width == 6 and type(loaded.hparams.namespace) is argparse.Namespace
    assert_same(weights(loaded), weights(model))


def test_a_malicious_pickled_ckpt_is_refused_and_never_run(tmp_path):
    from safeckpt.lightning import load_from_checkpoint

    from tests.ops.malicious_corpus import malicious_torch_file

    canary = tmp_path / "ran"
    malicious_torch_file(tmp_path / "evil.ckpt", canary)
    with pytest.raises(errors.UnsafeFileError, match="malicious"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(errors.UnsafeFileError):
        load_from_checkpoint(TinyModel, tmp_path / "evil.ckpt")
    assert not canary.exists()
