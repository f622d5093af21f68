"""merge: real torch-made checkpoints in, values checked against plain numpy references."""

from __future__ import annotations

import json
import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import safeckpt
from safeckpt import errors
from safeckpt.ops.merge import merger as merge_module
from safeckpt.ops.merge import methods as mm
from safeckpt.errors import IncompatibleInputsError
from safeckpt.ops.merge import MergeReport, merge
from safeckpt.ops.scan import scan
from safeckpt.sources.detect import open_source

from tests.ops.malicious_corpus import malicious_torch_file

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

FLOATS = ("embed.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias")


class Net(torch.nn.Module):
    """A tiny language-model-like module: tied head, int and bool buffers."""

    def __init__(self, step: int = 0) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(12, 6)
        self.proj = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("step", torch.tensor(step))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("position_ids", torch.arange(5))


def make_net(seed: int, step: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(step)
    with torch.no_grad():
        for p in net.norm.parameters():  # LayerNorm starts at ones/zeros: make it differ per model
            p.add_(torch.randn_like(p))
    return net


def numpy_state(net: Net) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() if v.is_floating_point() else v.numpy().copy()
            for k, v in net.state_dict().items()}


@pytest.fixture
def models(tmp_path):
    """Three fine-tunes of one model saved three ways, a base, and their values in numpy.

    a.pt: torch.save'd fp32 state dict; b.ckpt: a Lightning checkpoint; c.safetensors:
    safetensors.torch.save_model (the tied head stored once, named in the metadata).
    """
    nets = [make_net(seed, step=seed) for seed in (1, 2, 3)]
    base = make_net(0)
    paths = [tmp_path / "a.pt", tmp_path / "b.ckpt", tmp_path / "c.safetensors"]
    torch.save(nets[0].state_dict(), paths[0])
    torch.save({"state_dict": nets[1].state_dict(), "epoch": 3, "global_step": 120,
                "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.1}}, paths[1])
    st_torch.save_model(nets[2], str(paths[2]))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    return {"paths": [str(p) for p in paths], "base": str(tmp_path / "base.pt"),
            "values": [numpy_state(n) for n in nets], "base_values": numpy_state(base), "dir": tmp_path}


def load(path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in safeckpt.load_file(str(path)).items()}


def metadata(path) -> dict[str, str]:
    with safeckpt.safe_open(str(path), framework="numpy") as f:
        return f.metadata()


# --- references: the definitions, written out plainly in numpy (float64) -------------------

def ref_linear(xs, w):
    w = np.asarray(w, np.float64) / np.sum(w)
    return sum(wi * x.astype(np.float64) for wi, x in zip(w, xs))


def ref_ema(xs, d):
    e = xs[0].astype(np.float64)
    for x in xs[1:]:
        e = d * e + (1 - d) * x.astype(np.float64)
    return e


def ref_slerp(a, b, t):
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= 1e-8 or nb <= 1e-8:
        return (1 - t) * a + t * b
    cos = np.sum((a / na) * (b / nb))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return np.sin((1 - t) * omega) / np.sin(omega) * a + np.sin(t * omega) / np.sin(omega) * b


def ref_task_arithmetic(base, xs, lam):
    base = base.astype(np.float64)
    return base + lam * sum(x.astype(np.float64) - base for x in xs)


def ref_ties(base, xs, density, lam):
    base = base.astype(np.float64)
    taus = []
    for x in xs:
        tau = (x.astype(np.float64) - base).reshape(-1)
        k = max(1, int(density * tau.size))
        kth = np.sort(np.abs(tau))[::-1][k - 1]
        taus.append(np.where(np.abs(tau) >= kth, tau, 0.0))
    taus = np.stack(taus)
    sign = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    out = np.zeros(taus.shape[1])
    for j in range(taus.shape[1]):
        agreeing = [v for v in taus[:, j] if v != 0 and np.sign(v) == sign[j]]
        out[j] = np.mean(agreeing) if agreeing else 0.0
    return base + lam * out.reshape(base.shape)


def ref_dare(base, xs, density, lam, seed, name):
    base = base.astype(np.float64)
    total = np.zeros(base.shape)
    for i, x in enumerate(xs):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, *_name_words(name)]))
        keep = rng.random(base.size).reshape(base.shape) < density
        total += np.where(keep, (x.astype(np.float64) - base) / density, 0.0)
    return base + lam * total


def _name_words(name: str) -> list[int]:
    import hashlib
    return np.frombuffer(hashlib.blake2b(name.encode(), digest_size=16).digest(), "<u4").tolist()


# --- methods against the references ------------------------------------------------------

def test_linear_uniform_over_three_formats(models, tmp_path):
    out = tmp_path / "soup.safetensors"
    report = merge(models["paths"], out)
    got, xs = load(out), models["values"]
    for name in FLOATS:
        np.testing.assert_allclose(got[name], ref_linear([x[name] for x in xs], [1, 1, 1]), rtol=1e-6, atol=1e-7)
        # computed as numpy computes a mean in float32: the sum, then one division
        np.testing.assert_array_equal(got[name], (xs[0][name] + xs[1][name] + xs[2][name]) / np.float32(3))
        assert got[name].dtype == np.float32
    # not averaged: the first input's values, and the disagreement is reported
    assert got["step"] == 1 and got["step"].dtype == np.int64
    assert report.differing == ["step"] and "step" in report.copied
    np.testing.assert_array_equal(got["mask"], [True, False, True])
    np.testing.assert_array_equal(got["position_ids"], np.arange(5))
    # the tied head is merged and stored once, as save_model does; torch loads it back tied
    assert "head.weight" not in got and report.aliases == {"head.weight": "embed.weight"}
    assert metadata(out)["head.weight"] == "embed.weight"
    net = Net()
    missing, unexpected = st_torch.load_model(net, str(out))
    assert not missing and not unexpected
    assert net.head.weight.data_ptr() == net.embed.weight.data_ptr()
    assert isinstance(report, MergeReport) and report.to_dict()["merged"] == len(FLOATS)
    assert report.scan_verdicts and set(report.scan_verdicts.values()) == {"safe"}


def test_linear_weights_normalised_or_not(models, tmp_path):
    xs = models["values"]
    merge(models["paths"], tmp_path / "w.safetensors", weights=[0.5, 0.3, 0.2])
    merge(models["paths"], tmp_path / "sum.safetensors", weights=[2, 1, 1], normalize=False)
    weighted, summed = load(tmp_path / "w.safetensors"), load(tmp_path / "sum.safetensors")
    for name in FLOATS:
        np.testing.assert_allclose(weighted[name], ref_linear([x[name] for x in xs], [0.5, 0.3, 0.2]),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(summed[name], 2 * xs[0][name].astype(np.float64) + xs[1][name] + xs[2][name],
                                   rtol=1e-6, atol=1e-6)


def test_ema_over_ordered_checkpoints(models, tmp_path):
    merge(models["paths"], tmp_path / "ema.safetensors", "ema", decay=0.9)
    got = load(tmp_path / "ema.safetensors")
    for name in FLOATS:
        np.testing.assert_allclose(got[name], ref_ema([x[name] for x in models["values"]], 0.9),
                                   rtol=1e-6, atol=1e-7)
    assert mm.ema_weights(3, 0.9) == pytest.approx([0.81, 0.09, 0.1])


def test_slerp_and_its_lerp_fallbacks(models, tmp_path):
    report = merge(models["paths"][:2], tmp_path / "s.safetensors", "slerp", t=0.3)
    got = load(tmp_path / "s.safetensors")
    for name in FLOATS:
        a, b = models["values"][0][name], models["values"][1][name]
        np.testing.assert_allclose(got[name], ref_slerp(a, b, 0.3), rtol=1e-5, atol=1e-6)
    assert report.parameters == {"t": 0.3}
    # parallel vectors and a zero vector: plain lerp
    a = np.arange(1, 7, dtype=np.float32)
    np.testing.assert_allclose(mm.slerp(a, 2 * a, 0.25), 1.25 * a, rtol=1e-6)
    np.testing.assert_allclose(mm.slerp(np.zeros(6, np.float32), a, 0.25), 0.25 * a, rtol=1e-6)
    # orthogonal unit vectors: the arc's midpoint
    np.testing.assert_allclose(mm.slerp(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.5), [0.5 ** 0.5] * 2)


def test_task_arithmetic(models, tmp_path):
    merge(models["paths"], tmp_path / "ta.safetensors", "task-arithmetic", base=models["base"], lambda_=0.7)
    got = load(tmp_path / "ta.safetensors")
    for name in FLOATS:
        ref = ref_task_arithmetic(models["base_values"][name], [x[name] for x in models["values"]], 0.7)
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6)


def test_ties(models, tmp_path):
    report = merge(models["paths"], tmp_path / "ties.safetensors", "ties", base=models["base"], density=0.3,
                   lambda_=0.9)
    got = load(tmp_path / "ties.safetensors")
    for name in FLOATS:
        ref = ref_ties(models["base_values"][name], [x[name] for x in models["values"]], 0.3, 0.9)
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6)
    assert report.parameters == {"lambda": 0.9, "density": 0.3}
    record = json.loads(metadata(tmp_path / "ties.safetensors")["safeckpt.merge"])
    assert record == {"method": "ties", "lambda": 0.9, "density": 0.3, "inputs": ["a.pt", "b.ckpt", "c.safetensors"],
                      "base": "base.pt"}


def test_ties_threshold_is_the_kth_largest():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for values in (np.abs(rng.standard_normal(1000)), np.round(np.abs(rng.standard_normal(1000)), 1),
                       np.zeros(10), np.full(7, 3.0)):
            values = values.astype(dtype)
            for density in (0.01, 0.2, 0.5, 1.0):
                k = max(1, int(density * values.size))
                assert mm.ties_threshold(values.copy(), density) == np.sort(values)[::-1][k - 1]
    assert mm.ties_threshold(np.zeros(0, np.float32), 0.2) == math.inf


def test_dare_reproducible_and_seeded(models, tmp_path):
    paths, base = models["paths"], models["base"]
    merge(paths, tmp_path / "d0.safetensors", "dare", base=base, density=0.5, seed=7)
    merge(paths, tmp_path / "d1.safetensors", "dare", base=base, density=0.5, seed=7)
    merge(paths, tmp_path / "d2.safetensors", "dare", base=base, density=0.5, seed=8)
    first, again, other = (load(tmp_path / f"d{k}.safetensors") for k in range(3))
    assert (tmp_path / "d0.safetensors").read_bytes() == (tmp_path / "d1.safetensors").read_bytes()
    for name in FLOATS:
        ref = ref_dare(models["base_values"][name], [x[name] for x in models["values"]], 0.5, 1.0, 7, name)
        np.testing.assert_allclose(first[name], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[n], other[n]) for n in FLOATS)


@pytest.mark.parametrize("method, options", [
    ("linear", {"weights": [0.5, 0.3, 0.2]}),
    ("ema", {"decay": 0.8}),
    ("task-arithmetic", {"lambda_": 0.5}),
    ("ties", {"density": 0.4}),
    ("dare", {"density": 0.3, "seed": 3}),
])
def test_blocked_equals_whole_array(models, tmp_path, monkeypatch, method, options):
    """Blocks of 6 elements (many per tensor, a partial one at the end) give the whole-array result."""
    paths = models["paths"]
    task = method in merge_module.TASK_METHODS
    kwargs = dict(options, base=models["base"]) if task else options
    merge(paths, tmp_path / "whole.safetensors", method, **kwargs)
    monkeypatch.setattr(merge_module, "BLOCK_ELEMENTS", 6)
    merge(paths, tmp_path / "blocked.safetensors", method, **kwargs)
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "blocked.safetensors").read_bytes()
    got, xs, b = load(tmp_path / "blocked.safetensors"), models["values"], models["base_values"]
    for name in FLOATS:
        arrays = [x[name] for x in xs]
        expected = {
            "linear": lambda: mm.linear(arrays, options.get("weights")),
            "ema": lambda: mm.ema(arrays, 0.8),
            "task-arithmetic": lambda: mm.task_arithmetic(b[name], arrays, lam=0.5),
            "ties": lambda: mm.ties(b[name], arrays, density=0.4),
            "dare": lambda: mm.dare(b[name], arrays, density=0.3, seed=3, name=name),
        }[method]()
        np.testing.assert_array_equal(got[name], expected.astype(np.float32))


def test_blocked_slerp_matches(models, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_module, "BLOCK_ELEMENTS", 4)
    merge(models["paths"][:2], tmp_path / "s.safetensors", "slerp", t=0.6)
    got = load(tmp_path / "s.safetensors")
    for name in FLOATS:
        a, b = models["values"][0][name], models["values"][1][name]
        np.testing.assert_allclose(got[name], mm.slerp(a, b, 0.6), rtol=1e-6, atol=1e-7)


# --- inputs that do not line up ----------------------------------------------------------

def test_mismatched_shapes_are_listed(tmp_path):
    a = {f"w{i}": np.zeros((2, 3), np.float32) for i in range(25)}
    b = {f"w{i}": np.zeros((3, 2), np.float32) for i in range(25)}
    b["w24"] = np.zeros((2, 3), np.float32)
    safeckpt.save_file(a, tmp_path / "a.safetensors")
    safeckpt.save_file(b, tmp_path / "b.safetensors")
    with pytest.raises(IncompatibleInputsError) as info:
        merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "out.safetensors")
    message = str(info.value)
    assert "24 tensors differ in shape" in message and "and 4 more" in message
    assert "w0: a.safetensors F32[2, 3], b.safetensors F32[3, 2]" in message
    assert len(info.value.offenders) == 24 and "w24" not in message
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_tensors_refused_then_allowed(tmp_path):
    a = {"shared": np.full(4, 1.0, np.float32), "only_a": np.full(2, 5.0, np.float32)}
    b = {"shared": np.full(4, 3.0, np.float32)}
    c = {"shared": np.full(4, 8.0, np.float32), "only_a": np.full(2, 9.0, np.float32)}
    paths = []
    for name, tensors in (("a", a), ("b", b), ("c", c)):
        paths.append(tmp_path / f"{name}.safetensors")
        safeckpt.save_file(tensors, paths[-1])
    with pytest.raises(IncompatibleInputsError, match="only_a: missing from .*b.safetensors"):
        merge(paths, tmp_path / "out.safetensors")
    report = merge(paths, tmp_path / "out.safetensors", weights=[1, 2, 3], allow_missing=True)
    got = load(tmp_path / "out.safetensors")
    np.testing.assert_allclose(got["shared"], (1 * 1 + 2 * 3 + 3 * 8) / 6)
    np.testing.assert_allclose(got["only_a"], (1 * 5 + 3 * 9) / 4)  # renormalised over a and c
    assert report.missing == {"only_a": [str(paths[1])]}


def test_missing_with_task_vectors_and_base(tmp_path):
    base = {"w": np.zeros(3, np.float32)}
    a = {"w": np.full(3, 1.0, np.float32), "extra": np.full(2, 4.0, np.float32)}
    b = {"w": np.full(3, 2.0, np.float32)}
    for name, tensors in (("base", base), ("a", a), ("b", b)):
        safeckpt.save_file(tensors, tmp_path / f"{name}.safetensors")
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(IncompatibleInputsError, match="extra: missing from the base"):
        merge([paths[0]], tmp_path / "o.safetensors", "task-arithmetic", base=tmp_path / "base.safetensors")
    report = merge(paths, tmp_path / "o.safetensors", "task-arithmetic", base=tmp_path / "base.safetensors",
                   allow_missing=True)
    got = load(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(got["w"], np.full(3, 3.0, np.float32))
    np.testing.assert_array_equal(got["extra"], np.full(2, 4.0, np.float32))  # no base: from the first input
    assert report.copied == ["extra"] and any("not in the base" in n for n in report.notes)


def test_a_tie_stored_once_is_merged_as_one_tensor(tmp_path):
    """A tied .pt merged with a file that stores the tie once (as transformers writes it): one tensor."""
    a, b = make_net(1), make_net(2)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    state = {k: v for k, v in b.state_dict().items() if k != "head.weight"}  # the embedding only
    st_torch.save_file(state, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    for allow_missing in (False, True):
        out = tmp_path / f"out{allow_missing}.safetensors"
        report = merge([tmp_path / "b.safetensors", tmp_path / "a.pt"], out, allow_missing=allow_missing)
        got = load(out)
        assert "head.weight" not in got and report.aliases == {"head.weight": "embed.weight"}
        assert not report.missing and any("head.weight" in note for note in report.notes)
        expected = (b.embed.weight.detach().numpy() + a.embed.weight.detach().numpy()) / np.float32(2)
        np.testing.assert_array_equal(got["embed.weight"], expected)
        net = Net()
        missing, unexpected = st_torch.load_model(net, str(out))
        assert not missing and not unexpected and torch.equal(net.head.weight, net.embed.weight)


def test_names_tied_in_one_input_but_not_another_are_merged_apart(tmp_path):
    a, b = make_net(1), make_net(2)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    untied = {k: v.clone() for k, v in b.state_dict().items()}
    untied["head.weight"] = untied["head.weight"] * 2  # b's head differs from its embedding
    torch.save(untied, tmp_path / "b.pt")
    report = merge([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "out.safetensors")
    got = load(tmp_path / "out.safetensors")
    assert report.aliases == {} and not report.missing
    embed = a.embed.weight.detach().numpy()
    np.testing.assert_array_equal(got["embed.weight"], (embed + untied["embed.weight"].numpy()) / np.float32(2))
    np.testing.assert_array_equal(got["head.weight"], (embed + untied["head.weight"].numpy()) / np.float32(2))


def test_the_first_name_of_a_tie_in_input_order_is_kept(tmp_path):
    weight = torch.randn(4, 4)
    for name in ("x", "y"):
        torch.save({"z.embed": weight, "a.head": weight}, tmp_path / f"{name}.pt")
    report = merge([tmp_path / "x.pt", tmp_path / "y.pt"], tmp_path / "out.safetensors")
    assert report.aliases == {"a.head": "z.embed"}  # state-dict order, not the alphabet
    np.testing.assert_array_equal(load(tmp_path / "out.safetensors")["z.embed"], weight.numpy())


# --- dtypes -------------------------------------------------------------------------------

def test_dtype_cast_and_bf16_inputs(models, tmp_path):
    xs = models["values"]
    merge(models["paths"], tmp_path / "bf16.safetensors", dtype="bf16")
    got = load(tmp_path / "bf16.safetensors")
    for name in FLOATS:
        mean = (xs[0][name] + xs[1][name] + xs[2][name]) / np.float32(3)  # float32 throughout, as numpy does
        expected = torch.from_numpy(mean).to(torch.bfloat16).view(torch.int16).numpy()
        assert got[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[name].view(np.int16), expected)
    assert got["position_ids"].dtype == np.int64  # integers are never cast
    # bf16 inputs: accumulated in float32, written back in bf16
    for k, net in enumerate((make_net(1), make_net(2))):
        torch.save(net.to(torch.bfloat16).state_dict(), tmp_path / f"h{k}.pt")
    merge([tmp_path / "h0.pt", tmp_path / "h1.pt"], tmp_path / "h.safetensors")
    got = load(tmp_path / "h.safetensors")
    ref = (xs[0]["proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
           + xs[1]["proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)) / np.float32(2)
    assert got["proj.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["proj.weight"].astype(np.float32), ref.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_mixed_dtypes_and_float64_accumulation(tmp_path):
    x64 = np.array([1e-10, 1.0 + 2 ** -40, 3.0], np.float64)
    safeckpt.save_file({"w": x64, "v": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    safeckpt.save_file({"w": x64.astype(np.float32), "v": np.ones(2, ml_dtypes.bfloat16)}, tmp_path / "b.safetensors")
    report = merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    assert got["w"].dtype == np.float64 and got["v"].dtype == np.float32  # the first input's dtypes
    np.testing.assert_array_equal(got["w"], (x64 * 0.5) + (x64.astype(np.float32).astype(np.float64) * 0.5))
    assert any("different dtypes" in note for note in report.notes)


def test_overflow_counted_in_cast(tmp_path):
    safeckpt.save_file({"w": np.array([6e4, 1.0], np.float32)}, tmp_path / "a.safetensors")
    safeckpt.save_file({"w": np.array([6e4, 1.0], np.float32)}, tmp_path / "b.safetensors")
    with pytest.warns(RuntimeWarning, match="overflowed"):
        report = merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.safetensors",
                       weights=[1, 1], normalize=False, dtype="fp16")
    assert report.overflow == {"w": 1}
    assert np.isinf(load(tmp_path / "o.safetensors")["w"][0])


# --- output -------------------------------------------------------------------------------

def test_sharded_output(models, tmp_path):
    out = tmp_path / "sharded"
    report = merge(models["paths"], out, shard_size=200, verify=True)
    assert report.index is not None and len(report.outputs) > 1 and report.verified
    with open_source(report.index) as sharded:
        values = {name: np.asarray(sharded.read(name)) for name in sharded.infos}
    single = tmp_path / "single.safetensors"
    merge(models["paths"], single)
    assert values.keys() == load(single).keys()
    for name, value in load(single).items():
        np.testing.assert_array_equal(values[name], value)


def test_metadata(models, tmp_path):
    merge(models["paths"], tmp_path / "m.safetensors", weights=[2, 1, 1], metadata={"note": "soup"})
    meta = metadata(tmp_path / "m.safetensors")
    assert meta["format"] == "pt" and meta["safeckpt.version"] == safeckpt.__version__ and meta["note"] == "soup"
    assert json.loads(meta["safeckpt.merge"]) == {
        "method": "linear", "weights": [2.0, 1.0, 1.0], "normalize": True,
        "inputs": ["a.pt", "b.ckpt", "c.safetensors"]}


def test_streams_in_blocks(tmp_path, monkeypatch):
    """Memory is a few blocks, not the tensor: 4 MiB tensors merged with ~1 MiB traced at most."""
    big = np.arange(1 << 20, dtype=np.float32)
    for k in range(3):
        safeckpt.save_file({"w": big + k}, tmp_path / f"{k}.safetensors")
    monkeypatch.setattr(merge_module, "BLOCK_ELEMENTS", 4096)
    scan(tmp_path / "0.safetensors")  # the scan's modules are imported before memory is traced
    tracemalloc.start()
    try:
        merge([tmp_path / f"{k}.safetensors" for k in range(3)], tmp_path / "o.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < big.nbytes // 4
    np.testing.assert_allclose(load(tmp_path / "o.safetensors")["w"], big + 1, rtol=1e-6)


# --- refusals -----------------------------------------------------------------------------

def test_refuses_malicious_pickle(models, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(errors.UnsafeFileError, match="refusing to merge"):
        merge([models["paths"][0], bad], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    evil, canary = tmp_path / "evil.pt", tmp_path / "canary"
    malicious_torch_file(evil, canary)  # a real torch.save zip whose pickle also calls os.system
    with pytest.raises(errors.UnsafeFileError, match="posix.system.*merge anyway") as caught:
        merge([evil, evil], tmp_path / "o.safetensors")
    assert caught.value.report.verdict == "malicious" and not (tmp_path / "o.safetensors").exists()
    report = merge([evil, evil], tmp_path / "o.safetensors", allow_unsafe_structure=True)
    assert report.scan_verdicts == {str(evil): "malicious"} and not canary.exists()
    np.testing.assert_array_equal(load(tmp_path / "o.safetensors")["w"], np.arange(6.0).reshape(2, 3))
    with pytest.raises(errors.UnsafeFileError, match="refusing to merge"):  # as the base too
        merge([models["paths"][0]], tmp_path / "o2.safetensors", "task-arithmetic", base=bad)


@pytest.mark.parametrize("method, options, message", [
    ("slerp", {}, "exactly two"),
    ("ties", {}, "needs the base"),
    ("linear", {"weights": [1, 2]}, "2 weights for 3 inputs"),
    ("linear", {"t": 0.5}, "t does not apply to linear"),
    ("linear", {"weights": [1, -1, 0]}, "sum to 0"),
    ("ema", {}, "needs a decay"),
    ("ema", {"decay": 1.5}, "decay must be"),
    ("dare", {"base": "BASE", "density": 0.0}, "density must be"),
    ("dare", {"base": "BASE", "seed": -1}, "seed must be"),
    ("soup", {}, "unknown merge method"),
])
def test_bad_parameters(models, tmp_path, method, options, message):
    options = {k: models["base"] if v == "BASE" else v for k, v in options.items()}
    with pytest.raises(errors.SafeckptError, match=message):
        merge(models["paths"], tmp_path / "o.safetensors", method, **options)
    assert not (tmp_path / "o.safetensors").exists()


# --- other layouts and dtypes -------------------------------------------------------------

def test_sharded_and_strided_inputs(models, tmp_path, monkeypatch):
    """A sharded model folder merges from its shard files; torch views (transposed, offset) keep C order."""
    sharded = merge([models["paths"][0]], tmp_path / "folder", shard_size=200)
    assert sharded.index is not None
    with open_source(tmp_path / "folder") as folder:
        path, offset = merge_module._file_span(folder, "proj.weight")
        assert path.startswith(str(tmp_path / "folder")) and offset > 0
    merge([tmp_path / "folder", models["paths"][1]], tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    np.testing.assert_allclose(got["proj.weight"], ref_linear([x["proj.weight"] for x in models["values"][:2]],
                                                              [1, 1]), rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    big = [torch.randn(6, 10) for _ in range(2)]
    for k, t in enumerate(big):
        torch.save({"t": t.t(), "rows": t[2:4], "strided": t[:, ::3]}, tmp_path / f"v{k}.pt")
    monkeypatch.setattr(merge_module, "BLOCK_ELEMENTS", 4)
    merge([tmp_path / "v0.pt", tmp_path / "v1.pt"], tmp_path / "v.safetensors", weights=[0.25, 0.75])
    got = load(tmp_path / "v.safetensors")
    for name, view in (("t", lambda t: t.t()), ("rows", lambda t: t[2:4]), ("strided", lambda t: t[:, ::3])):
        ref = ref_linear([view(t).numpy() for t in big], [0.25, 0.75])
        np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-7)


def test_fp8_and_fp4_inputs(tmp_path):
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(16).astype(np.float32) for _ in range(2)]
    for k, v in enumerate(values):
        safeckpt.save_file({"e4m3": v.astype(ml_dtypes.float8_e4m3fn), "fp4": v.astype(ml_dtypes.float4_e2m1fn)},
                           tmp_path / f"{k}.safetensors")
    merge([tmp_path / "0.safetensors", tmp_path / "1.safetensors"], tmp_path / "o.safetensors")
    got = load(tmp_path / "o.safetensors")
    for name, dtype in (("e4m3", ml_dtypes.float8_e4m3fn), ("fp4", ml_dtypes.float4_e2m1fn)):
        mean = values[0].astype(dtype).astype(np.float32) * np.float32(0.5) \
            + values[1].astype(dtype).astype(np.float32) * np.float32(0.5)
        assert got[name].dtype == dtype
        np.testing.assert_array_equal(got[name].astype(np.float32), mean.astype(dtype).astype(np.float32))
