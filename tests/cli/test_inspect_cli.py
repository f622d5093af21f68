"""`safeckpt inspect` on real files: folded layers, modules, dtype shares, checkpoints, shards, scans."""

from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import safeckpt

from tests.cli.runner import cells, invoke
from tests.ops.malicious_corpus import Call, G, make_corpus, program, torch_zip

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

LAYERS, HIDDEN, INTER, VOCAB = 4, 16, 40, 64
LAYER_WEIGHTS = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (8, HIDDEN),
                 "self_attn.v_proj.weight": (8, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                 "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
                 "mlp.down_proj.weight": (HIDDEN, INTER)}
LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def inspect_json(*args) -> dict:
    result = invoke("inspect", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def llama_state_dict() -> dict:
    """A tiny Llama with the real names: bf16 weights, fp32 norms."""
    torch.manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)}
    for i in range(LAYERS):
        for name, shape in LAYER_WEIGHTS.items():
            sd[f"model.layers.{i}.{name}"] = torch.randn(*shape, dtype=torch.bfloat16)
        for name in LAYER_NORMS:
            sd[f"model.layers.{i}.{name}"] = torch.ones(HIDDEN)
    sd["model.norm.weight"] = torch.ones(HIDDEN)
    sd["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)
    return sd


@pytest.fixture
def state_dict() -> dict:
    return llama_state_dict()


@pytest.fixture
def llama_st(tmp_path, state_dict) -> Path:
    path = tmp_path / "model.safetensors"
    st_torch.save_file(state_dict, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture
def lightning_ckpt(tmp_path, state_dict) -> Path:
    path = tmp_path / "last.ckpt"
    exp_avg = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)} for i in range(3)}
    torch.save({"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "2.4.0",
                "state_dict": state_dict,
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 7}}}},
                "optimizer_states": [{"state": exp_avg, "param_groups": [{"lr": 3e-4, "params": [0, 1, 2]}]}],
                "lr_schedulers": [],
                "hyper_parameters": {"lr": 3e-4, "hidden": HIDDEN, "optim": {"name": "adamw", "betas": [0.9, 0.95]}}},
               path)
    return path


def parameters(sd: dict) -> int:
    return sum(t.numel() for t in sd.values())


# --- the grouped view ----------------------------------------------------------------------

def test_grouped_view_folds_repeated_layers(llama_st, state_dict):
    result = invoke("inspect", llama_st)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    up = next(line for line in lines if line.startswith("model.layers.{0..3}.mlp.up_proj.weight "))
    assert cells(up) == ["model.layers.{0..3}.mlp.up_proj.weight", "4 ×", f"[{INTER}, {HIDDEN}]", "BF16",
                         f"{4 * INTER * HIDDEN:,}", f"{8 * INTER * HIDDEN:,}"]
    norm = next(line for line in lines if line.startswith("model.layers.{0..3}.input_layernorm.weight "))
    assert cells(norm)[1:4] == ["4 ×", f"[{HIDDEN}]", "F32"]
    head = next(line for line in lines if line.startswith("lm_head.weight "))
    assert cells(head) == ["lm_head.weight", f"[{VOCAB}, {HIDDEN}]", "BF16", f"{VOCAB * HIDDEN:,}",
                           f"{2 * VOCAB * HIDDEN:,}"]
    assert not any(line.startswith("model.layers.0.") for line in lines)
    assert f"{len(state_dict)} tensors in 12 rows" in result.stdout
    assert f"parameters  {parameters(state_dict):,}" in result.stdout


def test_flat_lists_every_tensor(llama_st, state_dict):
    result = invoke("inspect", llama_st, "--flat")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for name, tensor in state_dict.items():
        row = next(cells(line) for line in lines if line.startswith(name + " "))
        assert row[2] == "[" + ", ".join(map(str, tensor.shape)) + "]"
        assert row[3] == f"{tensor.numel():,}"
    assert "{0..3}" not in result.stdout.split("module")[0]


def test_json_groups_modules_and_shares(llama_st, state_dict):
    report = inspect_json(llama_st)
    total = parameters(state_dict)
    groups = {g["pattern"]: g for g in report["groups"]}
    assert len(report["groups"]) == 3 + len(LAYER_WEIGHTS) + len(LAYER_NORMS)
    up = groups["model.layers.{0..3}.mlp.up_proj.weight"]
    assert up == {"pattern": "model.layers.{0..3}.mlp.up_proj.weight", "count": 4, "dtype": "BF16",
                  "shape": [INTER, HIDDEN], "parameters": 4 * INTER * HIDDEN, "bytes": 8 * INTER * HIDDEN,
                  "indices": [[0, 1, 2, 3]]}
    assert sum(g["count"] for g in report["groups"]) == len(state_dict)
    modules = {m["name"]: m for m in report["modules"]}
    assert list(modules) == ["model", "lm_head"]  # file order: F32 (the norms) first, then BF16 by name
    model_params = sum(t.numel() for n, t in state_dict.items() if n.startswith("model."))
    assert modules["model"]["parameters"] == model_params
    assert modules["model"]["share"] == pytest.approx(model_params / total)
    assert modules["lm_head"]["share"] == pytest.approx(VOCAB * HIDDEN / total)
    children = {c["name"]: c for c in modules["model"]["children"]}
    assert set(children) == {"model.embed_tokens", "model.layers", "model.norm"}
    assert children["model.layers"]["tensors"] == LAYERS * (len(LAYER_WEIGHTS) + len(LAYER_NORMS))
    assert report["modules_prefix"] is None
    f32 = sum(t.numel() for t in state_dict.values() if t.dtype == torch.float32)
    assert report["share_by_dtype"] == pytest.approx({"F32": f32 / total, "BF16": 1 - f32 / total})
    # the keys that were there before are unchanged
    assert report["totals_by_dtype"]["F32"] == {"tensors": 2 * LAYERS + 1, "parameters": f32, "bytes": 4 * f32}
    assert report["header_size"] + report["totals"]["bytes"] == report["file_size"]
    assert "scan" not in report  # safetensors holds no code; its header was validated


def test_human_modules_and_dtype_shares(llama_st, state_dict):
    out = invoke("inspect", llama_st).stdout
    total = parameters(state_dict)
    model_params = sum(t.numel() for n, t in state_dict.items() if n.startswith("model."))
    rows = {cells(line)[0]: cells(line) for line in out.splitlines() if line.strip()}
    assert rows["model"] == ["model", str(len(state_dict) - 1), f"{model_params:,}",
                             f"{100 * model_params / total:.1f}%"]
    assert rows["model.layers"][1] == str(LAYERS * 9)
    assert out.index("\nlm_head ") > out.index("\nmodule ")
    f32 = sum(t.numel() for t in state_dict.values() if t.dtype == torch.float32)
    assert f"  dtypes      F32 {100 * f32 / total:.1f}%, BF16 {100 - 100 * f32 / total:.1f}%" in out


def test_small_model_without_repetition_prints_the_flat_table(tmp_path):
    path = tmp_path / "small.safetensors"
    safeckpt.save_file({"embed.weight": np.zeros((4, 2), np.float32), "head.weight": np.zeros((2, 4), np.float32),
                        "layers.0.w": np.zeros(3, np.float16)}, path)
    out = invoke("inspect", path).stdout
    assert cells(next(line for line in out.splitlines() if line.startswith("layers.0.w "))) == [
        "layers.0.w", "F16", "[3]", "3", "6"]
    assert "rows, repeated layers folded" not in out


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    safeckpt.save_file({}, path)
    result = invoke("inspect", path)
    assert result.exit_code == 0
    assert "no tensors" in result.stdout
    assert inspect_json(path)["groups"] == [] and inspect_json(path)["modules"] == []


# --- PyTorch and Lightning checkpoints ------------------------------------------------------

def test_torch_pt(tmp_path, state_dict):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, path)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert "  scan        safe" in result.stdout
    assert re.search(r"model\.layers\.\{0\.\.3\}\.mlp\.up_proj\.weight +4 ×", result.stdout)
    report = inspect_json(path)
    assert report["format"] == "torch-zip"
    assert report["scan"] == {"verdict": "safe", "files": 1, "findings": [], "findings_total": 0, "error": None}
    assert [m["name"] for m in report["modules"]] == ["model", "lm_head"]  # torch keeps the dict's order
    assert report["totals"]["parameters"] == parameters(state_dict)


def test_lightning_checkpoint(lightning_ckpt, state_dict):
    result = invoke("inspect", lightning_ckpt)
    assert result.exit_code == 0, result.output
    out = result.stdout
    table = out.index("\nname ")
    for line in ("  epoch = 7", "  global_step = 1234", "  pytorch-lightning_version = 2.4.0",
                 "  hyper_parameters.lr = 0.0003", "  hyper_parameters.optim.name = adamw",
                 "  hyper_parameters.optim.betas = [0.9, 0.95]"):
        assert 0 < out.index(line + "\n") < table, line  # near the top, before the tensors
    assert "state_dict.model.layers.{0..3}.mlp.up_proj.weight" in out
    assert "optimizer_states.0.state.{0..2}.exp_avg" in out
    assert "modules (the 'state_dict' prefix left out):" in out
    report = inspect_json(lightning_ckpt)
    assert report["structure"]["epoch"] == 7
    assert report["structure"]["hyper_parameters"]["optim"]["betas"] == [0.9, 0.95]
    assert report["modules_prefix"] == "state_dict"
    modules = {m["name"]: m for m in report["modules"]}
    assert list(modules) == ["model", "lm_head", "optimizer_states"]
    assert modules["optimizer_states"]["tensors"] == 6
    assert modules["model"]["parameters"] == sum(t.numel() for n, t in state_dict.items() if n.startswith("model."))
    assert report["scan"]["verdict"] == "safe"


@dataclass
class RunConfig:
    lr: float = 0.1


def test_suspicious_checkpoint_is_described_with_its_verdict(tmp_path, state_dict):
    path = tmp_path / "with_config.pt"
    torch.save({"model": state_dict, "config": RunConfig()}, path)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert re.search(r"  scan        suspicious \(\d+ findings?\)", result.stdout)
    assert "RunConfig" in result.stdout
    report = inspect_json(path)
    assert report["scan"]["verdict"] == "suspicious"
    assert any(f["what"].endswith("RunConfig") for f in report["scan"]["findings"])


# --- malicious files --------------------------------------------------------------------------

def test_malicious_pickle_is_described_never_run(tmp_path):
    canary = tmp_path / "canary"
    evil, _ = program(2, Call(G("os", "system"), (f"touch {canary}",)))
    path = tmp_path / "evil.pt"
    path.write_bytes(torch_zip(evil))
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert "  scan        MALICIOUS: os.system in archive/data.pkl@" in result.stdout
    report = inspect_json(path)
    assert report["scan"]["verdict"] == "malicious"
    first = report["scan"]["findings"][0]
    assert (first["severity"], first["what"], first["member"], first["file"]) == (
        "malicious", "os.system", "archive/data.pkl", str(path))
    assert "os.system" in report["unknown_globals"]
    assert not canary.exists()


def test_every_corpus_file_gets_its_verdict(tmp_path):
    items = make_corpus(tmp_path)
    for item in items:
        result = invoke("inspect", item.path, "--json")
        if result.exit_code == 0:  # described, with the verdict
            assert json.loads(result.stdout)["scan"]["verdict"] == "malicious", item.name
        else:  # could not be described: the error line still gives the verdict
            assert result.exit_code == 1, (item.name, result.output)
            assert "(scan: malicious: " in result.stderr, item.name
            assert len(result.stderr.splitlines()) == 1
    assert not [item.canary for item in items if item.canary.exists()]


# --- sharded models ---------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path, llama_st) -> Path:
    out = tmp_path / "sharded"
    safeckpt.convert(llama_st, out, shard_size=4000)
    return out


def test_sharded_folder_and_index_describe_the_whole_model(sharded, state_dict):
    index = sharded / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shard_names = sorted(set(weight_map.values()))
    assert len(shard_names) > 1
    report = inspect_json(sharded)
    assert report["format"] == "sharded"
    assert report["totals"]["tensors"] == len(state_dict)
    assert report["totals"]["parameters"] == parameters(state_dict)
    assert [s["file"] for s in report["shards"]] == shard_names
    for shard in report["shards"]:
        names = [n for n, f in weight_map.items() if f == shard["file"]]
        assert shard["tensors"] == len(names)
        assert shard["bytes"] == sum(state_dict[n].numel() * state_dict[n].element_size() for n in names)
        assert shard["file_size"] == (sharded / shard["file"]).stat().st_size
    tensor_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    assert report["index"] == {"file": str(index), "total_size": tensor_bytes, "tensor_bytes": tensor_bytes,
                               "matches": True}
    assert "scan" not in report
    assert {g["pattern"]: g["count"] for g in report["groups"]}["model.layers.{0..3}.mlp.up_proj.weight"] == 4
    by_index = inspect_json(index)
    assert by_index["groups"] == report["groups"] and by_index["shards"] == report["shards"]
    out = invoke("inspect", sharded).stdout
    for name in shard_names:
        assert re.search(rf"\n{re.escape(name)} +safetensors +\d+ +[\d,]+ +[\d,]+\n", out)
    assert f"total_size {tensor_bytes:,} bytes, as the tensors hold" in out
    assert re.search(r"model\.layers\.\{0\.\.3\}\.mlp\.up_proj\.weight +4 ×", out)


def test_sharded_total_size_mismatch_is_a_warning(sharded):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"]["total_size"] += 100
    index.write_text(json.dumps(data))
    result = invoke("inspect", sharded)
    assert result.exit_code == 0
    assert re.search(r"warning: index model\.safetensors\.index\.json says total_size [\d,]+ bytes but the "
                     r"tensors hold [\d,]+ bytes \(-100\)", result.stdout)
    assert inspect_json(sharded)["index"]["matches"] is False
    del data["metadata"]["total_size"]
    index.write_text(json.dumps(data))
    assert inspect_json(sharded)["index"]["matches"] is None


def test_sharded_reads_only_the_shard_headers(sharded, monkeypatch):
    shards = sorted(sharded.glob("*.safetensors"))
    headers = sum(safeckpt.SafetensorsFile(path).header.data_start for path in shards)
    requested = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: requested.append(
        sum(len(b) for b in buffers)) or real_preadv(fd, buffers, offset))
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: pytest.fail("inspect mapped a shard"))
    result = invoke("inspect", sharded)
    assert result.exit_code == 0, result.output
    assert 0 < sum(requested) <= headers + 64 * len(shards)


def test_sharded_torch_bins_are_scanned(tmp_path, state_dict):
    folder = tmp_path / "bins"
    folder.mkdir()
    names = list(state_dict)
    halves = {"pytorch_model-00001-of-00002.bin": names[:20], "pytorch_model-00002-of-00002.bin": names[20:]}
    for file, part in halves.items():
        torch.save({n: state_dict[n] for n in part}, folder / file)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    report = inspect_json(folder)
    assert [(s["file"], s["format"], s["tensors"]) for s in report["shards"]] == [
        ("pytorch_model-00001-of-00002.bin", "torch-zip", 20),
        ("pytorch_model-00002-of-00002.bin", "torch-zip", len(names) - 20)]
    assert report["scan"]["verdict"] == "safe" and report["scan"]["files"] == 2
    assert report["index"]["matches"] is True
    assert "  scan        safe" in invoke("inspect", folder).stdout


def test_folder_with_one_safetensors_file_reads_its_header(tmp_path, llama_st, monkeypatch):
    header_size = safeckpt.SafetensorsFile(llama_st).header.data_start
    requested = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: requested.append(
        sum(len(b) for b in buffers)) or real_preadv(fd, buffers, offset))
    report = inspect_json(tmp_path)
    assert report["file"] == str(llama_st)
    assert report["format"] == "safetensors" and report["header_size"] == header_size
    assert sum(requested) <= 2 * (header_size + 64)  # the folder's file is found, then described


# --- other formats and help ---------------------------------------------------------------------

def test_npz(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, **{f"blocks.{i}.w": np.zeros((2, 3), np.float32) for i in range(3)}, bias=np.zeros(3))
    report = inspect_json(path)
    assert report["format"] == "npz"
    assert [(g["pattern"], g["count"]) for g in report["groups"]] == [("blocks.{0..2}.w", 3), ("bias", 1)]
    assert report["scan"]["verdict"] == "safe"


def test_help():
    result = invoke("inspect", "--help")
    assert result.exit_code == 0
    for text in ("Examples:", "safeckpt inspect", "--flat", "--json", "Exit codes:", "scan --strict",
                 "model.layers.{0..31}.mlp.up_proj.weight"):
        assert text in result.stdout, text


def test_tied_tensors_are_counted_once(tmp_path):
    embed = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = embed.weight
    torch.save({"embed.weight": embed.weight, "head.weight": head.weight, "norm": torch.ones(8)},
               tmp_path / "tied.pt")
    report = inspect_json(tmp_path / "tied.pt")
    assert report["totals"]["tensors"] == 3 and report["totals"]["tied"] == 1
    assert report["totals"]["parameters"] == 100 * 8 + 8
    assert report["totals_by_dtype"]["F32"]["parameters"] == 100 * 8 + 8
    assert "tied tensors counted once" in invoke("inspect", tmp_path / "tied.pt").stdout
