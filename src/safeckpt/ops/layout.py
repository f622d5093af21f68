"""How a model's tensors are laid out: repeated layers folded, parameters per module.

Folding
-------
Names are dotted paths. A component that is a canonical decimal integer
(``0``, ``17``; not ``07``, not ``conv1``) is an index slot. Tensors whose names
agree everywhere except in their index slots, and that have the same dtype
and shape, form a family; a family is written as boxes of index sets::

    model.layers.{0..31}.mlp.up_proj.weight                    32 x [11008, 4096] BF16
    model.layers.{0..31}.block_sparse_moe.experts.{0..7}.w1.weight   256 x [14336, 4096]

A box is a Cartesian product of one index set per slot; a slot with one value
is written as that value. When a family is not one product (layer 3 has more
experts than the others), it is split on its first slot, and the values of that
slot whose remaining boxes are equal are merged again; so every tensor is in
exactly one group, and a family that is a product is one group.

Shapes that differ across layers are not folded together: dtype and shape are
part of the family, so layers ``{0..2}`` (dense) and ``{3..60}`` (MoE) come out as
two groups, and a tensor whose shape differs in every layer is not folded at
all. Groups are listed in the order of their first tensor; indices are sorted
numerically. The work is linear in the total length of the names.

Modules
-------
`module_totals` adds up tensors, parameters and bytes by the first dotted
component (after removing a wrapper prefix such as Lightning's ``state_dict``),
and one level below it for modules made of sub-modules.

Tied weights
------------
Names that hold one tensor (an embedding matrix and the head that reuses it)
form a tie group; a safetensors file stores each group once. `tie_groups` lists
the groups in the source's state-dict order and `dropped_ties` says which names
are left out: every one but the first, which is the name transformers keeps
(embeddings precede heads in every Hugging Face model). When the model's
``config.json`` is known, a group is left whole unless transformers ties its
weights again on load (`transformers_ties`), since a name it does not re-tie
would load as random values; writing both names costs bytes, never correctness.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

__all__ = ["Group", "ModuleTotal", "group_tensors", "format_indices", "module_totals", "is_index", "tie_groups",
           "dropped_ties", "transformers_ties"]

# Names with more index components than this are not folded: real ones have up to four
# (SD's input_blocks.1.0.in_layers.0), and splitting boxes costs time and recursion per slot.
MAX_SLOTS = 8
# A module with more sub-modules than this is not broken down (the grouped view shows them).
MAX_CHILDREN = 32


class Group(NamedTuple):
    """Tensors of one dtype and shape whose names differ only in folded indices.

    `pattern` is the display name (``h.{0..11}.attn.c_attn.weight``); `indices`
    has one sorted tuple per folded slot, left to right (empty for one tensor);
    `names` are the members in index order; `parameters` and `bytes` are totals.
    """

    pattern: str
    indices: tuple[tuple[int, ...], ...]
    count: int
    shape: tuple[int, ...]
    dtype: str
    parameters: int
    bytes: int
    names: tuple[str, ...]


class ModuleTotal(NamedTuple):
    """Totals of one module (a name prefix); `children` are its sub-modules, if shown."""

    name: str
    tensors: int
    parameters: int
    bytes: int
    children: tuple["ModuleTotal", ...] = ()


def is_index(part: str) -> bool:
    """True for a path component that is a layer index: a canonical decimal integer.

    >>> is_index("12"), is_index("012"), is_index("conv1"), is_index("٣")
    (True, False, False, False)
    """
    return part.isdigit() and part.isascii() and (part[0] != "0" or part == "0")


def format_indices(values: Iterable[int]) -> str:
    """Sorted indices as runs: three or more consecutive values become ``a..b``.

    >>> format_indices([0, 1, 2, 3, 5, 7, 8, 9])
    '0..3,5,7..9'
    """
    ordered = sorted(set(values))
    if len(ordered) >= 3 and ordered[-1] - ordered[0] == len(ordered) - 1:
        return f"{ordered[0]}..{ordered[-1]}"  # one run, as layer indices are: no walk needed
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ordered[i]}..{ordered[j]}")
        else:
            parts.extend(str(v) for v in ordered[i:j + 1])
        i = j + 1
    return ",".join(parts)


# A whole dotted component that is a canonical decimal integer (ASCII digits, no leading zero),
# with the dot before it, in a name with a dot put in front (a literal first is faster to find).
_DOT_SLOT = re.compile(r"\.(0|[1-9][0-9]*)(?=\.|\Z)")
# Stands for a slot in a family's template; names holding it are never folded.
_HOLE = "\0"


class _Family:
    """Tensors with one template (names with their index slots blanked), dtype and shape."""

    __slots__ = ("template", "members")

    def __init__(self, template: str) -> None:
        self.template = template
        self.members: dict[tuple[int, ...], tuple[int, str, int]] = {}  # indices -> position, name, bytes


def group_tensors(infos: Mapping[str, Any]) -> list[Group]:
    """Fold repeated layers: tensors whose names differ only in integer components.

    `infos` maps names to anything with ``dtype``, ``shape`` and ``nbytes``
    (`TensorInfo`). Every tensor is in exactly one group, in the order of each
    group's first tensor.

    >>> [(g.pattern, g.count) for g in group_tensors(source.infos)][:2]
    [('model.embed_tokens.weight', 1), ('model.layers.{0..31}.input_layernorm.weight', 32)]
    """
    families: dict[tuple, _Family] = {}
    placed: list[tuple[int, Group]] = []
    for position, (name, info) in enumerate(infos.items()):
        parts = _DOT_SLOT.split("." + name)  # pieces, with the index values between them
        if len(parts) == 1 or len(parts) > 2 * MAX_SLOTS + 1 or _HOLE in name:
            shape = tuple(info.shape)
            placed.append((position, Group(name, (), 1, shape, info.dtype, math.prod(shape), info.nbytes,
                                           (name,))))
            continue
        key = (("." + _HOLE).join(parts[0::2])[1:], info.dtype, tuple(info.shape))
        family = families.get(key)
        if family is None:
            family = families[key] = _Family(key[0])
        family.members[tuple(map(int, parts[1::2]))] = (position, name, info.nbytes)
    for (_, dtype, shape), family in families.items():
        for box in _boxes(list(family.members)):
            placed.append(_group(family, box, dtype, shape))
    placed.sort(key=lambda item: item[0])
    return [group for _, group in placed]


def _boxes(points: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], ...]]:
    """Disjoint products of index sets (one sorted tuple per slot) whose union is `points`."""
    if not points[0]:
        return [()]
    axes = [sorted({p[i] for p in points}) for i in range(len(points[0]))]
    if math.prod(len(axis) for axis in axes) == len(points):  # points are distinct
        return [tuple(tuple(axis) for axis in axes)]
    rests: dict[int, list[tuple[int, ...]]] = {}
    for p in points:
        rests.setdefault(p[0], []).append(p[1:])
    merged: dict[tuple, list[int]] = {}  # the boxes of the other slots -> first-slot values with them
    for first in sorted(rests):
        merged.setdefault(tuple(_boxes(rests[first])), []).append(first)
    return [(tuple(firsts),) + box for boxes, firsts in merged.items() for box in boxes]


def _group(family: _Family, box: tuple[tuple[int, ...], ...], dtype: str,
           shape: tuple[int, ...]) -> tuple[int, Group]:
    positions, names, sizes = zip(*map(family.members.__getitem__, _product(box)))
    pieces = family.template.split(_HOLE)
    shown = [str(values[0]) if len(values) == 1 else "{" + format_indices(values) + "}" for values in box]
    pattern = pieces[0] + "".join(slot + piece for slot, piece in zip(shown, pieces[1:]))
    count = len(names)
    group = Group(pattern, tuple(values for values in box if len(values) > 1), count, shape, dtype,
                  math.prod(shape) * count, sum(sizes), names)
    return min(positions), group


def _product(box: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    points: list[tuple[int, ...]] = [()]
    for values in box:
        points = [p + (v,) for p in points for v in values]
    return points


# --- modules ------------------------------------------------------------------------

class _Tally:
    __slots__ = ("tensors", "parameters", "bytes", "children", "deep")

    def __init__(self) -> None:
        self.tensors = self.parameters = self.bytes = 0
        self.children: dict[str, "_Tally"] = {}
        self.deep = False  # has a sub-module (a name three or more components long)

    def add(self, parameters: int, nbytes: int) -> None:
        self.tensors += 1
        self.parameters += parameters
        self.bytes += nbytes


def module_totals(infos: Mapping[str, Any], *, prefix: Optional[str] = None) -> list[ModuleTotal]:
    """Tensors, parameters and bytes per top-level module, in the order of their first tensor.

    Names under ``prefix.`` (a wrapper such as ``state_dict``) are counted without
    it; other names as they are. Integer components fold (``h.{0..11}``, and an
    ``nn.Sequential``'s ``{0..5}``). A module made of sub-modules lists them as
    `children` (unless it has more than `MAX_CHILDREN`).

    >>> [(m.name, m.parameters) for m in module_totals(infos, prefix="state_dict")]
    [('model', 6979588096), ('lm_head', 262668288)]
    """
    cut = prefix + "." if prefix else None
    top: dict[Optional[str], _Tally] = {}  # first component (None: an index) -> totals
    top_indices: set[int] = set()
    child_indices: dict[Optional[str], set[int]] = {}
    for name, info in infos.items():
        if cut is not None and name.startswith(cut):
            name = name[len(cut):]
        parts = name.split(".", 2)  # the module, the sub-module, and whether there is more
        parameters, nbytes = math.prod(info.shape), info.nbytes
        head = parts[0] if not parts[0].isdigit() else _slot(parts[0], top_indices)
        tally = top.get(head)
        if tally is None:
            tally = top[head] = _Tally()
        tally.add(parameters, nbytes)
        if len(parts) >= 2:
            key = parts[1] if not parts[1].isdigit() else _slot(parts[1], child_indices.setdefault(head, set()))
            child = tally.children.get(key)
            if child is None:
                child = tally.children[key] = _Tally()
            child.add(parameters, nbytes)
            tally.deep = tally.deep or len(parts) == 3
    totals = []
    for head, tally in top.items():
        label = _label(head, top_indices)
        children: tuple[ModuleTotal, ...] = ()
        if tally.deep and 2 <= len(tally.children) <= MAX_CHILDREN:
            children = tuple(ModuleTotal(f"{label}.{_label(key, child_indices.get(head, set()))}", c.tensors,
                                         c.parameters, c.bytes) for key, c in tally.children.items())
        totals.append(ModuleTotal(label, tally.tensors, tally.parameters, tally.bytes, children))
    return totals


def _slot(part: str, indices: set[int]) -> Optional[str]:
    """`part`, or None for an index (whose value joins `indices`, for the display name)."""
    if not is_index(part):
        return part
    indices.add(int(part))
    return None


def _label(part: Optional[str], indices: set[int]) -> str:
    if part is not None:
        return part
    return str(next(iter(indices))) if len(indices) == 1 else "{" + format_indices(indices) + "}"


# --- tied weights -----------------------------------------------------------------

# Model types whose configuration class in transformers 5 defaults ``tie_word_embeddings``
# to True: a config.json without the key ties there (transformers 4 left the key out
# exactly when it was True). A type missing here only costs a duplicate tensor.
_TIED_BY_DEFAULT = frozenset("""
    albert aya_vision bart bert bert-generation big_bird bigbird_pegasus biogpt blenderbot blenderbot-small
    blip blip_text_model bloom camembert canary cohere cohere2 cohere2_moe cohere2_vision cohere_compass_text
    convbert cpmant csm ctrl d_fine dab-detr data2vec-text deberta deberta-v2 deepseek_vl deepseek_vl_hybrid
    deformable_detr deimv2 diffusion_gemma diffusion_gemma_text distilbert electra ernie ernie4_5 ernie4_5_moe
    ernie4_5_vl_moe ernie4_5_vl_moe_text esm falcon falcon_mamba flaubert flava florence2 fnet fun_asr_nano
    funnel gemma gemma2 gemma3 gemma3_text gemma3n gemma3n_text gemma4 gemma4_text gemma4_unified
    gemma4_unified_assistant gemma4_unified_text glmasr got_ocr2 gpt-sw3 gpt2 gpt_bigcode gpt_neo
    gpt_neox_japanese granite_docling granite_docling_text granite_speech granite_speech5_ctc
    granite_speech_plus granite_swa grounding-dino gte hunyuan_vl hunyuan_vl_text hyperclovax_vision_v2 ibert
    internvl janus jetmoe jina_embeddings_v3 kimi_k25 kosmos-2 kosmos-2.5 kosmos_2_5_text_model
    kosmos_2_text_model lara_mini layoutlm led lfm2 lfm2_moe lfm2_vl lfm3 lfm3_vl lighton_ocr longformer
    longt5 luke lxmert m2m_100 mamba marian mbart megatron-bert mimi mimi_decoder mimi_encoder minicpm3
    minicpm_ocr mistral3 mm-grounding-dino mobilebert modernbert modernbert-decoder moonshine
    moss_transcribe_diarize mpnet mpt mra mt5 mvp neomme nllb-moe nomic_bert nystromformer openai-gpt opt
    ovis2 paddleocr_vl paddleocr_vl_text paligemma pe_audio_video pegasus pegasus_x plbart pop2piano
    pp_chart2table pp_doclayout_v3 pp_doclayout_v4 prophetnet qwen2_5_omni_text qwen3_asr qwen3_vl_moe_text
    recurrent_gemma roberta roberta-prelayernorm roc_bert roformer rt_detr_v2 sam sam_hq seamless_m4t
    seamless_m4t_v2 shieldgemma2 smollm3 speech_to_text speecht5 squeezebert starcoder2 switch_transformers t5
    t5_gemma_module t5gemma t5gemma2 t5gemma2_decoder t5gemma2_encoder t5gemma2_text tapas trocr udop umt5
    vaultgemma vilt visual_bert voxtral_realtime whisper xglm xlm xlm-roberta xlm-roberta-xl xlnet xmod yoso
    youtu zamba zamba2 zaya
""".split())
# Model types whose configuration class sets ``tie_word_embeddings`` whatever config.json
# says: T5 and its kin always tie (a v1.1 config's False only stops the output scaling).
_TIES_REGARDLESS: dict[str, bool] = {
    **dict.fromkeys(("csm", "hunyuan_vl", "longt5", "mt5", "paddleocr_vl", "pop2piano", "shieldgemma2", "t5",
                     "udop", "umt5", "vilt"), True),
    **dict.fromkeys(("blt_global_transformer", "blt_local_decoder", "blt_patcher", "vibevoice"), False),
}


def transformers_ties(config: Mapping[str, Any]) -> bool:
    """Whether transformers ties a model's shared weights again when it loads it, from its config.json.

    Reproduces ``get_expanded_tied_weights_keys``: nothing is tied unless the
    configuration's ``tie_word_embeddings`` is true (its model type's default when
    the key is absent; some types fix it).

    >>> transformers_ties({"model_type": "gpt2"}), transformers_ties({"model_type": "llama"})
    (True, False)
    """
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in _TIES_REGARDLESS:
        return _TIES_REGARDLESS[model_type]
    value = config.get("tie_word_embeddings")
    if isinstance(value, bool):
        return value
    return isinstance(model_type, str) and model_type in _TIED_BY_DEFAULT


def tie_groups(pairs: Iterable[tuple[str, str]], order: Iterable[str]) -> list[list[str]]:
    """Groups of names holding one tensor, from pairs of tied names; each group in `order`.

    Groups come in the order of their first name; names not in `order` are left out.

    >>> tie_groups({"lm_head.weight": "wte.weight"}.items(), ["wte.weight", "h.0.w", "lm_head.weight"])
    [['wte.weight', 'lm_head.weight']]
    """
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while name in parent:
            parent[name] = parent.get(parent[name], parent[name])  # path halving: chains stay short
            name = parent[name]
        return name

    for one, other in pairs:
        a, b = root(one), root(other)
        if a != b:
            parent[a] = b
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(root(name), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def dropped_ties(groups: Iterable[Sequence[str]], config: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """``dropped -> kept`` for tie groups: the first name of each is kept, the others dropped.

    With the model's `config` (its config.json), groups transformers does not tie on
    load are kept whole (see `transformers_ties`).

    >>> dropped_ties([["model.embed_tokens.weight", "lm_head.weight"]])
    {'lm_head.weight': 'model.embed_tokens.weight'}
    >>> dropped_ties([["model.embed_tokens.weight", "lm_head.weight"]], {"model_type": "llama"})
    {}
    """
    if config is not None and not transformers_ties(config):
        return {}
    return {name: names[0] for names in groups for name in names[1:]}
