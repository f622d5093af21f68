"""A real Lightning checkpoint from a one-epoch Trainer.fit, read without torch or Lightning."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from safeckpt.sources import open_source  # noqa: E402

from tests.lightning_models import TinyModel, data  # noqa: E402


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    from omegaconf import OmegaConf
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    config = OmegaConf.create({"data": {"path": "/data/train", "batch": 16}, "tags": ["a", "b"]})
    model = TinyModel(width=8, lr=0.05, config=config)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, accelerator="cpu")
    trainer.fit(model, data(batch_size=16))
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path, model, trainer


def test_tensors_equal_the_trained_model(lightning_ckpt):
    path, model, trainer = lightning_ckpt
    with open_source(path) as src:
        assert src.format == "torch-zip"
        for name, tensor in model.state_dict().items():
            np.testing.assert_array_equal(src.read(f"state_dict.{name}"), tensor.numpy(), err_msg=name)
        opt_state = trainer.optimizers[0].state_dict()["state"][0]
        np.testing.assert_array_equal(src.read("optimizer_states.0.state.0.exp_avg"),
                                      opt_state["exp_avg"].numpy())


def test_structure_tree_is_readable(lightning_ckpt):
    path, model, trainer = lightning_ckpt
    with open_source(path) as src:
        tree = src.tree
        assert tree["epoch"] == trainer.current_epoch and tree["global_step"] == trainer.global_step == 4
        assert tree["pytorch-lightning_version"] == pl.__version__
        hp = tree["hyper_parameters"]
        assert hp["width"] == 8 and hp["lr"] == 0.05
        # the omegaconf DictConfig came out as plain data
        assert hp["config"]["data"] == {"path": "/data/train", "batch": 16}
        assert hp["config"]["tags"] == ["a", "b"]
        assert tree["optimizer_states"][0]["param_groups"][0]["lr"] == 0.05
        assert tree["lr_schedulers"][0]["step_size"] == 3


def test_lightning_globals_are_allowlisted_or_named(lightning_ckpt):
    path, _, _ = lightning_ckpt
    with open_source(path) as src:
        unknown = sorted({f"{g.module}.{g.name}" for g in src.globals if not g.allowed})
        # anything not allowlisted must be a genuinely non-plain-data class, not a tensor rebuild
        assert not any(name.startswith("torch._utils") for name in unknown), unknown


def test_scan_says_safe(lightning_ckpt):
    from safeckpt import scan
    path, _, _ = lightning_ckpt
    report = scan(path)
    assert report.verdict == "safe", [(f.severity, f.what, f.why) for f in report.findings]
    assert any(g.endswith("AttributeDict") or "omegaconf" in g for g in report.globals)


def test_converts_the_state_dict(lightning_ckpt, tmp_path):
    from safeckpt import convert, load_file
    path, model, _ = lightning_ckpt
    report = convert(path, tmp_path / "model.safetensors", verify=True)
    loaded = load_file(tmp_path / "model.safetensors")
    assert sorted(loaded) == sorted(model.state_dict())  # extract="auto" took the state_dict
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy())
    from safeckpt import safe_open
    with safe_open(tmp_path / "model.safetensors") as f:
        tree = json.loads(f.metadata()["safeckpt.tree"])
    assert tree["global_step"] == 4 and tree["hyper_parameters"]["width"] == 8
    assert report.verified
