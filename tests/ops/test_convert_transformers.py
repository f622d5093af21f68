"""Hugging Face pickles converted by safeckpt load in the real transformers, as its own files do.

Tiny random-init models built from configs (never the hub) are saved as transformers 4 did
with ``save_pretrained(safe_serialization=False)``: ``pytorch_model.bin``, or
``pytorch_model-0000k-of-0000N.bin`` shards and their index, tied weights sharing storage.
The conversion must keep the names transformers keeps in its own safetensors files, and
load in ``AutoModel`` and the task class with the values and outputs of the original.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import safeckpt
from safeckpt import errors
from safeckpt.ops.layout import dropped_ties, tie_groups, transformers_ties

torch = pytest.importorskip("torch")

INPUT_IDS = [[3, 14, 15, 92, 65, 35, 8, 9]]


def tiny(kind: str):
    """(the model, its task Auto class name) for a tiny random model of `kind`, seeded."""
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    llama = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 64}
    made = {
        "gpt2": lambda: (tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                                          n_positions=64)), "AutoModelForCausalLM"),
        "bert": lambda: (tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=37, vocab_size=100,
                                                          max_position_embeddings=64)), "AutoModelForMaskedLM"),
        "t5": lambda: (tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32,
                                                                 num_layers=2, num_heads=2)), "AutoModelForSeq2SeqLM"),
        "llama": lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(**llama, tie_word_embeddings=False)),
                          "AutoModelForCausalLM"),
        "llama-tied": lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(**llama, tie_word_embeddings=True)),
                               "AutoModelForCausalLM"),
    }[kind]
    model, task = made()
    return model.eval(), task


def save_bin(model, folder: Path, max_shard_size=None) -> None:
    """What ``save_pretrained(safe_serialization=False)`` wrote in transformers 4: the config files,
    then the state dict by torch.save, whole or in shards with an index (tied tensors share a shard)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    model.save_pretrained(folder)  # config.json (+ generation_config.json) and transformers' own safetensors
    for name in os.listdir(folder):
        if name.startswith("model") and ".safetensors" in name:
            os.remove(folder / name)
    state = model.state_dict()
    if max_shard_size is None:
        torch.save(state, folder / "pytorch_model.bin")
        return
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, folder / file)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def add_folder_extras(folder: Path) -> None:
    """What a downloaded model folder also holds: tokenizer files, a README, and pickles never to copy."""
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    (folder / "README.md").write_text("# a tiny model\n")
    torch.save({"lr": 0.1}, folder / "training_args.bin")
    torch.save({"step": 3}, folder / "rng_state")  # a pickle without an extension


def tensor_names(folder: Path) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safeckpt.safe_open(file) as f:
            names.update(f.keys())
    return names


def forward(model, task: str):
    ids = torch.tensor(INPUT_IDS)
    extra = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, **extra)
    return out.logits if task != "AutoModel" else out.last_hidden_state


def load(folder: Path, task: str):
    import transformers
    model, info = getattr(transformers, task).from_pretrained(folder, output_loading_info=True)
    return model.eval(), {k: sorted(v) for k, v in info.items() if k != "error_msgs"}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Per kind: the model, its task class, and the folder transformers itself saved it to."""
    pytest.importorskip("transformers")
    made = {}
    for kind in ("gpt2", "bert", "t5", "llama", "llama-tied"):
        model, task = tiny(kind)
        theirs = tmp_path_factory.mktemp(f"{kind}-transformers")
        model.save_pretrained(theirs)
        made[kind] = (model, task, theirs)
    return made


@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5", "llama", "llama-tied"])
@pytest.mark.parametrize("form", ["folder", "sharded folder", "file"])
def test_converted_pickles_load_in_transformers(hf_models, kind, form, tmp_path):
    model, task, theirs = hf_models[kind]
    pickles, ours = tmp_path / "pickles", tmp_path / "ours"
    pickles.mkdir()
    save_bin(model, pickles, max_shard_size="20KB" if form == "sharded folder" else None)
    add_folder_extras(pickles)
    if form == "file":
        report = safeckpt.convert(pickles / "pytorch_model.bin", ours)
        shutil.copy(pickles / "config.json", ours)  # a file's conversion copies nothing beside it
    else:
        report = safeckpt.convert(pickles, ours, shard_size="20KB" if form == "sharded folder" else None)
        expected = sorted(p.name for p in pickles.iterdir() if not p.name.startswith(("pytorch_model", "training_args",
                                                                                       "rng_state")))
        assert sorted(os.path.basename(p) for p in report.copied) == expected
        assert (ours / "README.md").read_bytes() == (pickles / "README.md").read_bytes()
    assert not (ours / "training_args.bin").exists() and not (ours / "rng_state").exists()
    # the names transformers keeps in its own safetensors files, no more, no fewer
    assert tensor_names(ours) == tensor_names(theirs)
    assert len(report.outputs) > 1 if form == "sharded folder" else len(report.outputs) == 1
    for output in report.outputs:
        with safeckpt.safe_open(output) as f:
            assert f.metadata()["format"] == "pt"
    for auto in (task, "AutoModel"):
        loaded, info = load(ours, auto)
        reference, reference_info = load(theirs, auto)
        assert info == reference_info, auto  # AutoModel on a task checkpoint: what transformers reports too
        if auto == task:
            assert not any(info.values()), info
        assert torch.equal(forward(loaded, auto), forward(reference, auto)), auto
        if auto == task:
            assert torch.equal(forward(loaded, auto), forward(model, auto))


def test_sharded_index_is_the_one_transformers_writes(hf_models, tmp_path):
    model, _, _ = hf_models["gpt2"]
    pickles, ours, theirs = tmp_path / "pickles", tmp_path / "ours", tmp_path / "theirs"
    pickles.mkdir()
    save_bin(model, pickles)
    model.save_pretrained(theirs, max_shard_size="20KB")
    report = safeckpt.convert(pickles, ours, shard_size="20KB")
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    expected = json.loads((theirs / "model.safetensors.index.json").read_text())
    expected["metadata"].pop("total_parameters", None)  # transformers 5 counts parameters; buffers are not
    assert index == expected  # total_size: bytes of the tensors written; every shard name and tensor
    assert (ours / "model.safetensors.index.json").read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert sorted(os.path.basename(p) for p in report.outputs) == sorted(set(expected["weight_map"].values()))
    assert sorted(os.path.basename(p) for p in report.copied) == ["config.json", "generation_config.json"]


def test_untied_config_keeps_every_name_that_shares_storage(tmp_path):
    """A Llama tied by hand whose config says untied: transformers will not tie it on load, so both are written."""
    model, _ = tiny("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    save_bin(model, tmp_path / "pickles")
    report = safeckpt.convert(tmp_path / "pickles", tmp_path / "ours")
    assert report.aliases == {} and any("tie_word_embeddings" in note for note in report.notes)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= tensor_names(tmp_path / "ours")
    loaded, info = load(tmp_path / "ours", "AutoModelForCausalLM")
    assert not any(info.values())
    assert torch.equal(forward(loaded, "AutoModelForCausalLM"), forward(model, "AutoModelForCausalLM"))


def test_without_a_config_the_first_name_in_state_dict_order_is_kept(tmp_path):
    model, _ = tiny("gpt2")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    report = safeckpt.convert(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    assert report.aliases == {"lm_head.weight": "transformer.wte.weight"}  # not the alphabet's lm_head
    with safeckpt.safe_open(tmp_path / "model.safetensors") as f:
        names, metadata = set(f.keys()), f.metadata()
    assert metadata["lm_head.weight"] == "transformer.wte.weight"
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_folder_files_are_never_overwritten_unasked(tmp_path):
    model, _ = tiny("gpt2")
    save_bin(model, tmp_path / "pickles")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text("{}")
    with pytest.raises(errors.OutputExistsError, match="config.json") as caught:
        safeckpt.convert(tmp_path / "pickles", ours)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in ours.iterdir()) == ["config.json"]  # nothing was written
    report = safeckpt.convert(tmp_path / "pickles", ours, overwrite=True)
    assert (ours / "config.json").read_bytes() == (tmp_path / "pickles" / "config.json").read_bytes()
    assert sorted(os.path.basename(p) for p in report.copied) == ["config.json", "generation_config.json"]


def test_converting_in_place_adds_the_safetensors(tmp_path):
    model, task = tiny("t5")
    save_bin(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = safeckpt.convert(tmp_path, tmp_path)
    assert report.copied == [] and {p.name for p in tmp_path.iterdir()} == set(before) | {"model.safetensors"}
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    os.remove(tmp_path / "pytorch_model.bin")
    loaded, info = load(tmp_path, task)
    assert not any(info.values()) and torch.equal(forward(loaded, task), forward(model, task))


def test_a_file_output_copies_nothing_and_says_so(tmp_path):
    model, _ = tiny("gpt2")
    save_bin(model, tmp_path / "pickles")
    report = safeckpt.convert(tmp_path / "pickles", tmp_path / "model.safetensors")
    assert report.copied == [] and any("not copied" in note for note in report.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "pickles"]


# --- the decision, from config.json alone ---------------------------------------------------

def test_tie_decision_from_config_json():
    assert transformers_ties({"model_type": "gpt2"})  # transformers 4 left the key out when it was True
    assert not transformers_ties({"model_type": "llama"})
    assert transformers_ties({"model_type": "llama", "tie_word_embeddings": True})
    assert transformers_ties({"model_type": "t5", "tie_word_embeddings": False})  # T5 v1.1: always tied
    assert not transformers_ties({"model_type": "a-model-no-one-knows"})  # unknown: write both, never lose one
    assert not transformers_ties({})
    groups = tie_groups({"lm_head.weight": "wte.weight", "e.w": "d.w"}.items(), ["wte.weight", "d.w", "lm_head.weight"])
    assert groups == [["wte.weight", "lm_head.weight"]]
    assert dropped_ties(groups) == {"lm_head.weight": "wte.weight"}
    assert dropped_ties(groups, {"model_type": "mistral"}) == {}


def test_tie_tables_agree_with_the_installed_transformers():
    """Every model type the tables name has that default (or fixed value) in transformers 5."""
    tf = pytest.importorskip("transformers")
    if int(tf.__version__.split(".")[0]) < 5:
        pytest.skip("the tables follow transformers 5's configuration classes")
    from safeckpt.ops import layout

    tf.logging.set_verbosity_error()
    wrong = []
    for model_type in sorted(layout._TIED_BY_DEFAULT | set(layout._TIES_REGARDLESS)):
        if model_type not in tf.CONFIG_MAPPING:
            continue  # named by a newer or older release
        config_class = tf.CONFIG_MAPPING[model_type]
        if model_type in layout._TIES_REGARDLESS:
            fixed = layout._TIES_REGARDLESS[model_type]
            if config_class(tie_word_embeddings=not fixed).tie_word_embeddings is not fixed:
                wrong.append(model_type)
        elif getattr(config_class(), "tie_word_embeddings", None) is not True:
            wrong.append(model_type)
    for model_type in ("llama", "mistral", "qwen2", "gpt_neox"):
        if getattr(tf.CONFIG_MAPPING[model_type](), "tie_word_embeddings", None) is not transformers_ties(
                {"model_type": model_type}):
            wrong.append(model_type)
    assert not wrong
