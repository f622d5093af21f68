"""Folding repeated layers and adding up modules (safeckpt.ops.layout) on real-looking name sets."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from safeckpt.ops.layout import Group, format_indices, group_tensors, is_index, module_totals
from safeckpt.sources.base import TensorInfo

HIDDEN, INTER, VOCAB = 64, 172, 320

LLAMA_LAYER = {  # name under model.layers.N -> shape (the seven weights and two norms of a Llama layer)
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.k_proj.weight": (16, HIDDEN),
    "self_attn.v_proj.weight": (16, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTER, HIDDEN),
    "mlp.up_proj.weight": (INTER, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTER),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}


def info(shape, dtype="BF16") -> TensorInfo:
    bits = {"BF16": 16, "F32": 32, "F16": 16}[dtype]
    return TensorInfo(dtype, tuple(shape), math.prod(shape) * bits // 8)


def llama(layers: int = 32) -> dict[str, TensorInfo]:
    infos = {"model.embed_tokens.weight": info((VOCAB, HIDDEN))}
    for i in range(layers):
        for name, shape in LLAMA_LAYER.items():
            infos[f"model.layers.{i}.{name}"] = info(shape, "F32" if "norm" in name else "BF16")
    infos["model.norm.weight"] = info((HIDDEN,), "F32")
    infos["lm_head.weight"] = info((VOCAB, HIDDEN))
    return infos


def by_pattern(groups: list[Group]) -> dict[str, Group]:
    return {g.pattern: g for g in groups}


def assert_partition(groups: list[Group], infos: dict) -> None:
    """Every tensor in exactly one group; each group's totals are its members' totals."""
    names = [n for g in groups for n in g.names]
    assert sorted(names) == sorted(infos)
    for g in groups:
        assert g.count == len(g.names)
        assert g.parameters == sum(math.prod(infos[n].shape) for n in g.names)
        assert g.bytes == sum(infos[n].nbytes for n in g.names)
        assert all(infos[n].dtype == g.dtype and tuple(infos[n].shape) == g.shape for n in g.names)
        assert g.count == math.prod(len(i) for i in g.indices)
    position = {name: i for i, name in enumerate(infos)}
    first = [min(position[n] for n in g.names) for g in groups]
    assert first == sorted(first), "groups come in the order of their first tensor"


# --- folding ----------------------------------------------------------------------------

def test_llama_folds_each_layer_weight_into_one_group():
    infos = llama(32)
    groups = group_tensors(infos)
    assert [g.pattern for g in groups] == (
        ["model.embed_tokens.weight"]
        + [f"model.layers.{{0..31}}.{name}" for name in LLAMA_LAYER]
        + ["model.norm.weight", "lm_head.weight"])
    up = by_pattern(groups)["model.layers.{0..31}.mlp.up_proj.weight"]
    assert (up.count, up.shape, up.dtype) == (32, (INTER, HIDDEN), "BF16")
    assert up.indices == (tuple(range(32)),)
    assert up.parameters == 32 * INTER * HIDDEN and up.bytes == 2 * up.parameters
    assert up.names == tuple(f"model.layers.{i}.mlp.up_proj.weight" for i in range(32))
    norm = by_pattern(groups)["model.layers.{0..31}.input_layernorm.weight"]
    assert norm.dtype == "F32" and norm.bytes == 32 * HIDDEN * 4
    single = by_pattern(groups)["lm_head.weight"]
    assert (single.count, single.indices, single.names) == (1, (), ("lm_head.weight",))
    assert_partition(groups, infos)


def test_file_order_is_kept_and_indices_sorted_numerically():
    # safetensors files list tensors sorted by name: layer 10 comes before layer 2
    infos = dict(sorted(llama(12).items()))
    groups = group_tensors(infos)
    assert groups[0].pattern == "lm_head.weight"
    up = by_pattern(groups)["model.layers.{0..11}.mlp.up_proj.weight"]
    assert up.indices == (tuple(range(12)),)
    assert up.names[:3] == tuple(f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 2))
    assert_partition(groups, infos)


def test_gpt2_names():
    infos = {"wte.weight": info((VOCAB, HIDDEN), "F32"), "wpe.weight": info((128, HIDDEN), "F32")}
    for i in range(12):
        infos[f"h.{i}.ln_1.weight"] = info((HIDDEN,), "F32")
        infos[f"h.{i}.attn.bias"] = info((1, 1, 128, 128), "F32")
        infos[f"h.{i}.attn.c_attn.weight"] = info((HIDDEN, 3 * HIDDEN), "F32")
        infos[f"h.{i}.attn.c_proj.weight"] = info((HIDDEN, HIDDEN), "F32")
        infos[f"h.{i}.mlp.c_fc.weight"] = info((HIDDEN, 4 * HIDDEN), "F32")
    infos["ln_f.weight"] = info((HIDDEN,), "F32")
    groups = group_tensors(infos)
    assert [g.pattern for g in groups] == [
        "wte.weight", "wpe.weight", "h.{0..11}.ln_1.weight", "h.{0..11}.attn.bias",
        "h.{0..11}.attn.c_attn.weight", "h.{0..11}.attn.c_proj.weight", "h.{0..11}.mlp.c_fc.weight",
        "ln_f.weight"]
    assert by_pattern(groups)["h.{0..11}.attn.c_attn.weight"].count == 12
    assert_partition(groups, infos)


def mixtral(layers: int = 4, experts: int = 8) -> dict[str, TensorInfo]:
    infos = {"model.embed_tokens.weight": info((VOCAB, HIDDEN))}
    for i in range(layers):
        infos[f"model.layers.{i}.self_attn.q_proj.weight"] = info((HIDDEN, HIDDEN))
        infos[f"model.layers.{i}.block_sparse_moe.gate.weight"] = info((experts, HIDDEN))
        for e in range(experts):
            for w, shape in (("w1", (INTER, HIDDEN)), ("w2", (HIDDEN, INTER)), ("w3", (INTER, HIDDEN))):
                infos[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = info(shape)
    return infos


def test_mixtral_experts_fold_in_two_components():
    infos = mixtral(layers=32, experts=8)
    groups = group_tensors(infos)
    w1 = by_pattern(groups)["model.layers.{0..31}.block_sparse_moe.experts.{0..7}.w1.weight"]
    assert w1.count == 256 and w1.indices == (tuple(range(32)), tuple(range(8)))
    assert w1.parameters == 256 * INTER * HIDDEN
    assert w1.names[:2] == ("model.layers.0.block_sparse_moe.experts.0.w1.weight",
                            "model.layers.0.block_sparse_moe.experts.1.w1.weight")
    assert [g.pattern for g in groups] == [
        "model.embed_tokens.weight",
        "model.layers.{0..31}.self_attn.q_proj.weight",
        "model.layers.{0..31}.block_sparse_moe.gate.weight",
        "model.layers.{0..31}.block_sparse_moe.experts.{0..7}.w1.weight",
        "model.layers.{0..31}.block_sparse_moe.experts.{0..7}.w2.weight",
        "model.layers.{0..31}.block_sparse_moe.experts.{0..7}.w3.weight"]
    assert_partition(groups, infos)


def test_an_irregular_expert_set_is_split_into_products():
    infos = mixtral(layers=4, experts=3)
    infos["model.layers.2.block_sparse_moe.experts.3.w1.weight"] = info((INTER, HIDDEN))
    groups = group_tensors(infos)
    patterns = [g.pattern for g in groups if ".w1." in g.pattern]
    assert patterns == ["model.layers.{0,1,3}.block_sparse_moe.experts.{0..2}.w1.weight",
                        "model.layers.2.block_sparse_moe.experts.{0..3}.w1.weight"]
    assert by_pattern(groups)[patterns[0]].indices == ((0, 1, 3), (0, 1, 2))
    assert by_pattern(groups)[patterns[1]].indices == ((0, 1, 2, 3),)
    assert_partition(groups, infos)


def test_non_contiguous_indices():
    infos = {f"blocks.{i}.w": info((4,)) for i in (9, 0, 1, 2, 3, 5, 7, 8)}
    (group,) = group_tensors(infos)
    assert group.pattern == "blocks.{0..3,5,7..9}.w"
    assert group.indices == ((0, 1, 2, 3, 5, 7, 8, 9),)
    assert group.names[0] == "blocks.0.w" and group.names[-1] == "blocks.9.w"


def test_shapes_that_differ_across_layers_fold_per_shape():
    infos = {}
    for i in range(6):  # DeepSeek-like: the first layers are dense, the rest narrower
        infos[f"layers.{i}.mlp.up.weight"] = info((32, 8) if i < 2 else (16, 8))
    infos.update({f"layers.{i}.attn.weight": info((i + 1, 8)) for i in range(3)})  # all different
    groups = group_tensors(infos)
    assert [(g.pattern, g.count) for g in groups] == [
        ("layers.{0,1}.mlp.up.weight", 2), ("layers.{2..5}.mlp.up.weight", 4),
        ("layers.0.attn.weight", 1), ("layers.1.attn.weight", 1), ("layers.2.attn.weight", 1)]
    assert_partition(groups, infos)


def test_dtypes_that_differ_are_not_folded_together():
    infos = {"a.0.w": info((2,), "F32"), "a.1.w": info((2,), "F16"), "a.2.w": info((2,), "F32")}
    groups = group_tensors(infos)
    assert [(g.pattern, g.dtype) for g in groups] == [("a.{0,2}.w", "F32"), ("a.1.w", "F16")]


def test_numbers_that_are_not_layer_indices():
    infos = {
        "conv1.weight": info((8, 3, 7, 7)),
        "layer1.0.conv1.weight": info((8, 8, 3, 3)),
        "layer1.1.conv1.weight": info((8, 8, 3, 3)),
        "blocks.07.w": info((2,)),   # a leading zero: a name, not an index
        "blocks.7.w": info((2,)),
        "v2.weight": info((2,)),
        "rope.theta_10000": info((2,)),
        "x.1e3.w": info((2,)),
        "y.-1.w": info((2,)),
        "z.+2.w": info((2,)),
    }
    groups = group_tensors(infos)
    assert [g.pattern for g in groups] == [
        "conv1.weight", "layer1.{0,1}.conv1.weight", "blocks.07.w", "blocks.7.w", "v2.weight",
        "rope.theta_10000", "x.1e3.w", "y.-1.w", "z.+2.w"]
    assert_partition(groups, infos)


def test_single_and_empty():
    assert group_tensors({}) == []
    (g,) = group_tensors({"model.layers.0.weight": info((3, 3))})
    assert g == Group("model.layers.0.weight", (), 1, (3, 3), "BF16", 9, 18, ("model.layers.0.weight",))


def test_huge_indices():
    big = 10**30
    infos = {f"a.{big + 1}.w": info((1,)), f"a.{big}.w": info((1,)), "a.2.w": info((1,)), "a.10.w": info((1,))}
    (g,) = group_tensors(infos)
    assert g.indices == ((2, 10, big, big + 1),)
    assert g.pattern == f"a.{{2,10,{big},{big + 1}}}.w"


def test_non_ascii_names():
    infos = {f"模型.层.{i}.权重": info((2, 2)) for i in range(3)}
    infos["模型.层.٣.权重"] = info((2, 2))  # Arabic-Indic three: not an index
    infos["é.0"] = info((1,))
    infos["é.1"] = info((1,))
    infos["nul.\0.x"] = info((1,))
    infos["nul.0.x"] = info((1,))
    groups = group_tensors(infos)
    assert [g.pattern for g in groups] == ["模型.层.{0..2}.权重", "模型.层.٣.权重", "é.{0,1}", "nul.\0.x", "nul.0.x"]
    assert_partition(groups, infos)


def test_names_with_many_indices_are_not_folded():
    # a hostile header: every name a diagonal point, so no slot would ever fold into a product
    many = [".".join("1" if j == i else "0" for j in range(200)) for i in range(200)]
    infos = {name: info((1,)) for name in many}
    infos.update({f"eight.{i}" + ".x.0" * 7: info((1,)) for i in range(3)})
    infos.update({f"nine.{i}" + ".x.0" * 8: info((1,)) for i in range(3)})
    groups = group_tensors(infos)
    assert [g.count for g in groups] == [1] * 200 + [3] + [1] * 3
    assert groups[200].pattern == "eight.{0..2}" + ".x.0" * 7
    assert_partition(groups, infos)


def test_optimizer_state_folds_around_a_constant_index():
    infos = {f"optimizer_states.0.state.{i}.exp_avg": info((4,), "F32") for i in range(5)}
    (g,) = group_tensors(infos)
    assert g.pattern == "optimizer_states.0.state.{0..4}.exp_avg"
    assert g.indices == ((0, 1, 2, 3, 4),)


def test_many_tensors():
    infos = {f"model.layers.{i}.weight": info((1,), "F32") for i in range(50_000)}
    infos.update({f"w{i}": info((1,), "F32") for i in range(50_000)})
    groups = group_tensors(infos)
    assert len(groups) == 1 + 50_000
    assert groups[0].pattern == "model.layers.{0..49999}.weight" and groups[0].count == 50_000


names = st.lists(st.tuples(st.sampled_from(["a", "b", "layers", "0", "1", "2", "10", "01", "x1"]),
                           st.sampled_from(["0", "1", "3", "w", "7"]),
                           st.sampled_from(["", ".0", ".1", ".weight"])),
                 min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(names, st.integers(0, 3))
def test_every_tensor_is_in_exactly_one_group(parts, seed):
    infos = {}
    for i, (a, b, c) in enumerate(parts):
        infos[f"{a}.{b}{c}"] = info(((i * seed) % 3 + 1,), "F32")
    groups = group_tensors(infos)
    assert_partition(groups, infos)
    for g in groups:  # the pattern, its index sets expanded, gives back exactly the names
        expanded = [g.pattern]
        for values in g.indices:
            text = "{" + format_indices(values) + "}"
            expanded = [e.replace(text, str(v), 1) for e in expanded for v in values]
        assert sorted(expanded) == sorted(g.names)


def test_format_indices():
    assert format_indices([0, 1, 2, 3, 5, 7, 8, 9]) == "0..3,5,7..9"
    assert format_indices([3, 1, 2]) == "1..3"
    assert format_indices([0, 1]) == "0,1"
    assert format_indices([4]) == "4"
    assert format_indices([0, 2, 4]) == "0,2,4"


def test_is_index():
    assert is_index("0") and is_index("31") and is_index(str(10**40))
    assert not any(is_index(p) for p in ("", "01", "-1", "1.0", "conv1", "٣", "１", "1_000"))


# --- modules -----------------------------------------------------------------------------

def test_llama_modules():
    infos = llama(4)
    modules = module_totals(infos)
    assert [m.name for m in modules] == ["model", "lm_head"]
    model, head = modules
    assert head == (("lm_head", 1, VOCAB * HIDDEN, 2 * VOCAB * HIDDEN, ()))
    assert [c.name for c in model.children] == ["model.embed_tokens", "model.layers", "model.norm"]
    layers = model.children[1]
    per_layer = sum(math.prod(s) for s in LLAMA_LAYER.values())
    assert (layers.tensors, layers.parameters) == (4 * len(LLAMA_LAYER), 4 * per_layer)
    assert model.parameters == sum(c.parameters for c in model.children)
    assert model.parameters + head.parameters == sum(math.prod(i.shape) for i in infos.values())
    assert model.bytes + head.bytes == sum(i.nbytes for i in infos.values())


def test_lightning_prefix_is_left_out():
    infos = {f"state_dict.{k}": v for k, v in llama(2).items()}
    infos["optimizer_states.0.state.0.exp_avg"] = info((4,), "F32")
    modules = module_totals(infos, prefix="state_dict")
    assert [m.name for m in modules] == ["model", "lm_head", "optimizer_states"]
    assert modules[2].children == ()  # its only sub-module is the index 0
    assert [m.name for m in module_totals(infos)] == ["state_dict", "optimizer_states"]


def test_numbered_modules_fold():
    infos = {"transformer.wte.weight": info((8, 4)), "transformer.ln_f.weight": info((4,))}
    infos.update({f"transformer.h.{i}.attn.weight": info((4, 4)) for i in range(3)})
    (transformer,) = module_totals(infos)
    assert [c.name for c in transformer.children] == ["transformer.wte", "transformer.ln_f", "transformer.h"]
    sequential = {"0.weight": info((2, 2)), "0.bias": info((2,)), "2.weight": info((2, 2)), "3.weight": info((2,))}
    (only,) = module_totals(sequential)
    assert (only.name, only.tensors, only.children) == ("{0,2,3}", 4, ())
    gpt2 = {f"h.{i}.attn.weight": info((4, 4)) for i in range(12)}
    gpt2["wte.weight"] = info((8, 4))
    h, wte = module_totals(gpt2)
    assert (h.name, h.tensors, h.children) == ("h", 12, ())  # only numbered sub-modules: nothing to break down


def test_modules_of_leaf_tensors_have_no_children():
    infos = {"layer.weight": info((2, 2)), "layer.bias": info((2,)), "w": info((3,))}
    assert module_totals(infos) == [("layer", 2, 6, 12, ()), ("w", 1, 3, 6, ())]
