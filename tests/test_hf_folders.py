"""Hugging Face Trainer and accelerate checkpoint folders made pickle-free, from folders the real libraries wrote."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

import safeckpt
import safeckpt.torch
from safeckpt import errors
from safeckpt.torch import safe_load
from safeckpt.torch.folders import convert_folder
from safeckpt.training import join_state

from tests.cli.runner import invoke
from tests.hf_checkpoints import accelerate_state, trainer_checkpoint
from tests.test_safe_load import assert_same_tree


@pytest.fixture(scope="module")
def trainer_folder(tmp_path_factory):
    return trainer_checkpoint(tmp_path_factory.mktemp("trainer"))


@pytest.fixture(scope="module")
def accelerate_folder(tmp_path_factory):
    return accelerate_state(tmp_path_factory.mktemp("accelerate"))


def read_back(folder, stem):
    tensors = safeckpt.torch.load_file(folder / f"{stem}.safetensors")
    return join_state(tensors, json.loads((folder / f"{stem}.json").read_text()))


def assert_pickle_free(folder):
    for path in sorted(folder.iterdir()):
        assert path.suffix in (".safetensors", ".json"), path
        report = safeckpt.scan(path)
        assert report.verdict == "safe" and report.format in ("safetensors", "json", "unknown"), (path, report.format)


def test_a_trainer_checkpoint_becomes_safetensors_and_json(trainer_folder, tmp_path):
    out = tmp_path / "safe"
    report = convert_folder(trainer_folder, out)
    names = sorted(os.listdir(out))
    assert names == ["config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_state.json",
                     "rng_state.safetensors", "scheduler.json", "scheduler.safetensors", "trainer_state.json",
                     "training_args.json", "training_args.safetensors"], names
    assert_pickle_free(out)
    # every pickle comes back as torch.load would have given it (its numpy arrays as arrays)
    for stem, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("rng_state", "rng_state.pth")):
        assert_same_tree(read_back(out, stem), safe_load(trainer_folder / name))
    assert_same_tree(read_back(out, "optimizer"), torch.load(trainer_folder / "optimizer.pt", weights_only=True))
    assert_same_tree(safeckpt.torch.load_file(out / "model.safetensors"),
                     safeckpt.torch.load_file(trainer_folder / "model.safetensors"))
    # TrainingArguments is never built: what the file says of it is kept as data
    args = read_back(out, "training_args")
    assert args["__class__"] == "transformers.training_args.TrainingArguments"
    assert args["state"][0]["max_steps"] == 4
    assert args["state"][0]["lr_scheduler_type"] == {"__class__": "transformers.trainer_utils.SchedulerType",
                                                      "args": ["linear"]}
    verdicts = {os.path.basename(state.source): state.scan_verdict for state in report.states}
    assert verdicts == {"optimizer.pt": "safe", "rng_state.pth": "safe", "scheduler.pt": "safe",
                        "training_args.bin": "suspicious"}
    assert "transformers.training_args.TrainingArguments" in report.states[-1].objects and report.notes


def test_the_converted_optimizer_resumes_as_the_pickled_one(trainer_folder, tmp_path):
    import transformers

    out = tmp_path / "safe"
    convert_folder(trainer_folder, out)
    config = transformers.BertConfig.from_pretrained(trainer_folder)

    def optimizer_from(state):
        params = list(transformers.BertForSequenceClassification(config).parameters())
        optimizer = torch.optim.AdamW([{"params": [params[i] for i in group["params"]]}
                                       for group in state["param_groups"]])  # the Trainer's two groups
        optimizer.load_state_dict(state)
        return optimizer.state_dict()

    assert_same_tree(optimizer_from(read_back(out, "optimizer")),
                     optimizer_from(torch.load(trainer_folder / "optimizer.pt", weights_only=True)))


def test_an_accelerate_state_folder_becomes_pickle_free(accelerate_folder, tmp_path):
    out = tmp_path / "safe"
    report = convert_folder(accelerate_folder, out)
    assert sorted(os.listdir(out)) == ["custom_checkpoint_0.json", "custom_checkpoint_0.safetensors",
                                       "model.safetensors", "optimizer.json", "optimizer.safetensors",
                                       "random_states_0.json", "random_states_0.safetensors", "scheduler.json",
                                       "scheduler.safetensors"]
    assert_pickle_free(out)
    assert read_back(out, "custom_checkpoint_0") == {"steps": 2}
    for stem, name in (("optimizer", "optimizer.bin"), ("scheduler", "scheduler.bin"),
                       ("random_states_0", "random_states_0.pkl")):
        assert_same_tree(read_back(out, stem), safe_load(accelerate_folder / name))
    assert all(state.scan_verdict == "safe" for state in report.states)


def test_the_cli_converts_a_folder_and_scan_explains_it(trainer_folder, tmp_path):
    scan = invoke("scan", str(trainer_folder), "--json")
    folder = json.loads(scan.stdout)["reports"][0]
    explained = [f for f in folder["findings"] if f["kind"] == "pickled-files"]
    assert explained and "training_args.bin would import and call 9" in explained[0]["why"]
    result = invoke("convert", str(trainer_folder), str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    states = {os.path.basename(s["source"]): s for s in json.loads(result.stdout)["states"]}
    assert set(states) == {"optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"}
    assert json.loads(result.stdout)["model"]["tensors"] > 0
    again = invoke("convert", str(trainer_folder), str(tmp_path / "out"), "--json")
    assert again.exit_code == 2 and json.loads(again.stdout)["error_type"] == "OutputExistsError"
    assert invoke("convert", str(trainer_folder), str(tmp_path / "out"), "--force").exit_code == 0


def test_a_malicious_pickle_in_the_folder_stops_everything(accelerate_folder, tmp_path):
    from tests.ops.malicious_corpus import malicious_torch_file

    folder = tmp_path / "folder"
    folder.mkdir()
    for path in accelerate_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    canary = tmp_path / "ran"
    malicious_torch_file(folder / "sampler.bin", canary)
    with pytest.raises(errors.UnsafeFileError, match="malicious"):
        convert_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    assert not canary.exists()
    result = invoke("convert", str(folder), str(tmp_path / "out2"), "--json")
    assert result.exit_code == 2 and json.loads(result.stdout)["error_type"] == "UnsafeFileError"
