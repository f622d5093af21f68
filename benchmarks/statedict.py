"""A model-like state dict of a given size: transformer tensors, half fp32 and half bf16 by bytes.

The layout is a decoder-only transformer (token embedding, per-layer
attention q/k/v/o with biases, a gated MLP, two norms per layer, a final norm
and an untied LM head), so sizes range from a few KiB (norms, biases) to
hundreds of MiB (embeddings). The number of layers is chosen so that the total
comes close to the requested size; dtypes are then assigned, largest tensor
first, to whichever of fp32/bf16 keeps the two byte totals closest.

Values are a fixed pseudo-random pattern tiled over each tensor: every page is
written (so RSS counts it) and building 1 GiB takes a fraction of a second.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

import ml_dtypes
import numpy as np

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

Spec = List[Tuple[str, Tuple[int, ...], str]]  # (name, shape, "F32" | "BF16")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": KiB, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": 1 << 40}

NUMPY_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16)}
ITEMSIZE = {"F32": 4, "BF16": 2}


def parse_size(text: str) -> int:
    """'256MiB', '1GiB', '4GiB', '512MB', '1e9' -> bytes (KiB/MiB/GiB binary, KB/MB/GB decimal)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 256MiB, 1GiB, 4GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _shape_of_model(total_bytes: int) -> Tuple[int, int]:
    """(hidden size, vocabulary) of a model of about this size."""
    if total_bytes <= 64 * MiB:
        return 256, 4096
    if total_bytes <= 512 * MiB:
        return 768, 16000
    if total_bytes <= 2 * GiB:
        return 1024, 32000
    return 2048, 32000


def model_spec(total_bytes: int) -> Spec:
    """Names, shapes and dtypes of a transformer state dict of about `total_bytes`."""
    d, vocab = _shape_of_model(total_bytes)
    ff = 256 * math.ceil(8 * d / 3 / 256)
    # Half the bytes fp32 (4 B), half bf16 (2 B): 3/8 of an element per byte on average.
    target_elements = total_bytes * 3 // 8
    per_layer = 4 * d * d + 3 * d * ff + 5 * d
    fixed = 2 * vocab * d + d
    layers = max(1, round((target_elements - fixed) / per_layer))
    shapes: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,))]
        for proj in "qkv":
            shapes += [(p + f"self_attn.{proj}_proj.weight", (d, d)), (p + f"self_attn.{proj}_proj.bias", (d,))]
        shapes += [(p + "self_attn.o_proj.weight", (d, d)),
                   (p + "post_attention_layernorm.weight", (d,)),
                   (p + "mlp.gate_proj.weight", (ff, d)),
                   (p + "mlp.up_proj.weight", (ff, d)),
                   (p + "mlp.down_proj.weight", (d, ff))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]

    dtypes: Dict[str, str] = {}
    totals = {"F32": 0, "BF16": 0}
    for name, shape in sorted(shapes, key=lambda item: (-math.prod(item[1]), item[0])):
        n = math.prod(shape)
        # Give the tensor the dtype that leaves the two byte totals closest.
        gap_if = {dt: abs((totals[dt] + n * ITEMSIZE[dt]) - totals[other])
                  for dt, other in (("F32", "BF16"), ("BF16", "F32"))}
        dtype = min(gap_if, key=gap_if.get)
        dtypes[name] = dtype
        totals[dtype] += n * ITEMSIZE[dtype]
    return [(name, shape, dtypes[name]) for name, shape in shapes]


def spec_bytes(spec: Spec) -> Dict[str, int]:
    """Bytes per dtype and in total."""
    out = {"F32": 0, "BF16": 0}
    for _, shape, dtype in spec:
        out[dtype] += math.prod(shape) * ITEMSIZE[dtype]
    out["total"] = out["F32"] + out["BF16"]
    return out


_PATTERN_BYTES = 1 * MiB
_PATTERNS: Dict[Tuple[str, int], np.ndarray] = {}


def _pattern(dtype: str, seed: int = 0) -> np.ndarray:
    """1 MiB of small normal values of `dtype`, as bytes (another `seed`: other values)."""
    if (dtype, seed) not in _PATTERNS:
        rng = np.random.default_rng(seed)
        values = (rng.standard_normal(_PATTERN_BYTES // ITEMSIZE[dtype], dtype=np.float32) * 0.02)
        _PATTERNS[dtype, seed] = values.astype(NUMPY_DTYPES[dtype]).view(np.uint8)
    return _PATTERNS[dtype, seed]


def fill(raw: np.ndarray, dtype: str, seed: int = 0) -> None:
    """Write the pattern of `dtype` over the flat uint8 array `raw`, in place (no temporaries)."""
    pattern = _pattern(dtype, seed)
    for start in range(0, raw.size, pattern.size):
        chunk = raw[start:start + pattern.size]
        chunk[...] = pattern[:chunk.size]


def numpy_state_dict(spec: Spec, seed: int = 0) -> Dict[str, np.ndarray]:
    """The spec as numpy arrays (bf16 from ml_dtypes), every page written; `seed` picks the values."""
    tensors = {}
    for name, shape, dtype in spec:
        array = np.empty(shape, dtype=NUMPY_DTYPES[dtype])
        fill(array.reshape(-1).view(np.uint8), dtype, seed)
        tensors[name] = array
    return tensors


def torch_state_dict(spec: Spec):
    """The spec as torch tensors (allocated by torch), every page written."""
    import torch

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16}
    tensors = {}
    for name, shape, dtype in spec:
        tensor = torch.empty(shape, dtype=dtypes[dtype])
        fill(tensor.reshape(-1).view(torch.uint8).numpy(), dtype)
        tensors[name] = tensor
    return tensors


def slice_tensor(rows: int = 4096, cols: int = 4096) -> np.ndarray:
    """The 4096x4096 fp32 tensor of the get_slice case."""
    array = np.empty((rows, cols), dtype=np.float32)
    fill(array.reshape(-1).view(np.uint8), "F32")
    return array
