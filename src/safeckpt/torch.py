"""Drop-in for ``safetensors.torch``: the same functions, signatures and results.

Replace ``from safetensors.torch import ...`` with ``from safeckpt.torch import ...``.
Differences: loads are zero-copy views of a private map of the file, tensors
that are not contiguous are written correctly in logical order instead of
being refused, and errors are `SafeckptError`s that name the file and tensor
(they also subclass the ValueError/RuntimeError safetensors raises).

>>> from safeckpt.torch import save_file, load_file, save_model, load_model
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List, Optional, Set, Tuple, Union

import torch

from . import api, errors


# --- shared (tied) tensors ------------------------------------------------------

def _storage_key(tensor: torch.Tensor):
    if tensor.device.type == "meta":
        return None
    storage = tensor.untyped_storage()
    if storage.data_ptr() == 0 or storage.nbytes() == 0:
        return None
    return tensor.device, storage.data_ptr(), storage.nbytes()


def _byte_range(tensor: torch.Tensor) -> Tuple[int, int]:
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = start + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) * tensor.element_size()
    return start, last + tensor.element_size()


def _find_shared_tensors(state_dict: Dict[str, torch.Tensor]) -> List[Set[str]]:
    """Groups of names whose bytes overlap (same storage, overlapping ranges)."""
    by_storage: Dict[tuple, List[str]] = defaultdict(list)
    for name, tensor in state_dict.items():
        key = _storage_key(tensor)
        if key is not None:
            by_storage[key].append(name)
    groups: List[Set[str]] = []
    for names in by_storage.values():
        spans = sorted((*_byte_range(state_dict[n]), n) for n in names)
        current, current_end = {spans[0][2]}, spans[0][1]
        for start, end, name in spans[1:]:
            if start >= current_end:
                groups.append(current)
                current, current_end = {name}, end
            else:
                current.add(name)
                current_end = max(current_end, end)
        groups.append(current)
    return sorted(groups, key=lambda g: sorted(g))


def _covers_storage(tensor: torch.Tensor) -> bool:
    storage = tensor.untyped_storage()
    return tensor.data_ptr() == storage.data_ptr() and tensor.numel() * tensor.element_size() == storage.nbytes()


def _remove_duplicate_names(state_dict: Dict[str, torch.Tensor], *, preferred_names=None,
                            discard_names=None) -> Dict[str, List[str]]:
    """For each group of tied tensors: the name to keep -> the names to drop."""
    preferred_names = set(preferred_names or [])
    discard_names = set(discard_names or [])
    to_remove: Dict[str, List[str]] = defaultdict(list)
    for group in _find_shared_tensors(state_dict):
        if len(group) < 2:
            continue
        complete = {name for name in group if _covers_storage(state_dict[name])}
        if not complete:
            raise errors.SharedTensorsError(
                f"tensors {sorted(group)} share memory but none covers the whole storage, so none can "
                "stand for the others; save them as separate tensors (e.g. .clone()) first")
        keep = min(complete)
        if complete - discard_names:
            keep = min(complete - discard_names)
        if preferred_names & complete:
            keep = min(preferred_names & complete)
        to_remove[keep].extend(sorted(name for name in group if name != keep))
    return to_remove


def _refuse_shared(tensors: Dict[str, torch.Tensor]) -> None:
    tied = [sorted(group) for group in _find_shared_tensors(tensors) if len(group) > 1]
    if tied:
        raise errors.SharedTensorsError(
            f"some tensors share memory, which would store them twice and load them untied: {tied}; "
            "use save_model(model, filename) to keep one of each group")


def _check_tensor_dict(tensors) -> None:
    if not isinstance(tensors, dict):
        raise errors.UnsupportedTensorError(f"expected a dict of [str, torch.Tensor] but received {type(tensors)}")
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise errors.UnsupportedTensorError(
                f"expected torch.Tensor but received {type(value)}", tensor=name)
        if value.layout != torch.strided:
            raise errors.UnsupportedTensorError(
                f"sparse tensors ({value.layout}) cannot be saved; call .to_dense() first "
                "(the file may be much larger)", tensor=name)
    _refuse_shared(tensors)


# --- the safetensors.torch API --------------------------------------------------

def save(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serialize tensors to safetensors bytes."""
    _check_tensor_dict(tensors)
    return api.save(tensors, metadata)


def save_file(tensors: Dict[str, torch.Tensor], filename: Union[str, os.PathLike],
              metadata: Optional[Dict[str, str]] = None) -> None:
    """Save tensors to a safetensors file, streamed from their memory and replaced atomically."""
    _check_tensor_dict(tensors)
    api.save_file(tensors, filename, metadata)


def load_file(filename: Union[str, os.PathLike], device: Union[str, int] = "cpu", *,
              backend: str = "mmap") -> Dict[str, torch.Tensor]:
    """Load tensors: zero-copy views of a private map of the file (writes never reach the file)."""
    return api.load_file(filename, framework="pt", device=device, backend=backend)


def load(data: bytes) -> Dict[str, torch.Tensor]:
    """Load tensors from safetensors bytes."""
    return api.load(data, framework="pt")


def save_model(model: torch.nn.Module, filename: Union[str, os.PathLike],
               metadata: Optional[Dict[str, str]] = None, force_contiguous: bool = True) -> None:
    """Save a model's state dict, keeping one tensor of each group of tied weights.

    Each dropped name is recorded in the metadata as ``dropped -> kept`` (user
    entries are never overwritten), as safetensors does.
    """
    state_dict = model.state_dict()
    for kept, dropped in _remove_duplicate_names(state_dict).items():
        for name in dropped:
            metadata = {} if metadata is None else metadata
            metadata.setdefault(name, kept)
            del state_dict[name]
    if force_contiguous:
        state_dict = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    save_file(state_dict, filename, metadata=metadata)


def load_model(model: torch.nn.Module, filename: Union[str, os.PathLike], strict: bool = True,
               device: Union[str, int] = "cpu", *, backend: str = "mmap") -> Tuple[Set[str], List[str]]:
    """Load a file saved by save_model into `model`; returns ``(missing, unexpected)``.

    Tied weights dropped at save time are not reported missing.
    """
    state_dict = load_file(filename, device=device, backend=backend)
    to_remove = _remove_duplicate_names(model.state_dict(), preferred_names=state_dict.keys())
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing)
    for names in to_remove.values():
        for name in names:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if strict and (missing or unexpected):
        message = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            message += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
        if unexpected:
            message += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
        raise RuntimeError(message)
    return missing, unexpected
