"""Drop-in for ``safetensors.torch``: the same functions, signatures and results.

Replace ``from safetensors.torch import ...`` with ``from safeckpt.torch import ...``.
Differences: loads are zero-copy views of a private map of the file, tensors
that are not contiguous are written correctly in logical order instead of
being refused, and errors are `SafeckptError`s that name the file and tensor
(they also subclass the ValueError/RuntimeError safetensors raises).

>>> from safeckpt.torch import save_file, load_file, save_model, load_model

safetensors.torch's helpers for tied weights (`storage_ptr`, `storage_size`,
`_find_shared_tensors`, `_remove_duplicate_names`, `_is_complete`, `_end_ptr`)
give the same results as theirs, and `_flatten_as_ptr` / `_flatten` give the
input of `serialize` in its safetensors 0.8 / 0.7 forms.

It also holds the training-state helpers: `training_state` gathers a run's
model, optimizer, scheduler, AMP scaler and RNG states into a plain tree, and
`restore_training_state` puts them back.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import numpy as np
import torch

from .. import api, errors
from ..api import safe_open  # noqa: F401  (as in safetensors.torch)
from ..format.writer import RawTensor, tensor_chunks
from ..tensor_spec import TensorSpec, deserialize, serialize, serialize_file  # noqa: F401  (as in safetensors.torch)
from .unpickle import Placeholder, PlaceholderCall, safe_load  # noqa: F401


# --- shared (tied) tensors: safetensors.torch's helpers, same names and results ---

def storage_ptr(tensor: torch.Tensor) -> int:
    """The address of the tensor's storage: 0 for meta tensors and storages without data."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):  # no plain storage: sparse tensors, some tensor subclasses
        return 0


def storage_size(tensor: torch.Tensor) -> int:
    """The size in bytes of the tensor's whole storage (which views may share)."""
    return tensor.untyped_storage().nbytes()


def _end_ptr(tensor: torch.Tensor) -> int:
    """One past the last byte the tensor's elements reach; its data_ptr when it has none.

    Computed from the strides, so transposed and expanded views work too.
    """
    if tensor.numel() == 0:
        return tensor.data_ptr()
    reach = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr() + (reach + 1) * tensor.element_size()


def _is_complete(tensor: torch.Tensor) -> bool:
    """True when the tensor starts its storage and its elements fill it (so it can stand for it)."""
    return tensor.data_ptr() == storage_ptr(tensor) and \
        tensor.numel() * tensor.element_size() == storage_size(tensor)


def _find_shared_tensors(state_dict: Dict[str, torch.Tensor]) -> List[Set[str]]:
    """Groups of names whose bytes overlap, in safetensors' order.

    Storages come in the order the state dict first names them; within one storage,
    runs of overlapping byte ranges in address order. Meta tensors and empty
    storages share nothing.

    >>> _find_shared_tensors({"a": w, "b": w[:1], "c": torch.ones(2)})
    [{'a', 'b'}, {'c'}]
    """
    by_storage: Dict[tuple, List[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.device.type != "meta" and storage_ptr(tensor) != 0 and storage_size(tensor) != 0:
            key = (tensor.device, storage_ptr(tensor), storage_size(tensor))
            by_storage.setdefault(key, []).append(name)
    groups: List[Set[str]] = []
    for names in by_storage.values():
        spans = sorted((state_dict[name].data_ptr(), _end_ptr(state_dict[name]), name) for name in names)
        current_end = None
        for start, end, name in spans:
            if current_end is None or start >= current_end:
                groups.append({name})
                current_end = end
            else:
                groups[-1].add(name)
                current_end = max(current_end, end)
    return groups


def _remove_duplicate_names(state_dict: Dict[str, torch.Tensor], *,
                            preferred_names: Optional[List[str]] = None,
                            discard_names: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """For each group of tied tensors: the name to keep -> the other names, sorted.

    The kept name covers the whole storage (`_is_complete`): the first in sorted
    order, preferring names not in `discard_names`, then names in `preferred_names`
    (the names a file holds, when loading). A defaultdict(list), as safetensors returns.

    >>> _remove_duplicate_names(model.state_dict())
    defaultdict(<class 'list'>, {'embed.weight': ['head.weight']})
    """
    preferred_names = set(preferred_names or [])
    discard_names = set(discard_names or [])
    to_remove: Dict[str, List[str]] = defaultdict(list)
    for group in _find_shared_tensors(state_dict):
        if len(group) < 2:
            continue
        complete = {name for name in group if _is_complete(state_dict[name])}
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


# --- safetensors' raw-buffer helpers ----------------------------------------------

def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).split(".")[-1]


def _flatten(tensors: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    """Tensors as safetensors <= 0.7's `serialize` took them: name -> {"dtype", "shape", "data"}.

    Checked as `save` checks them; `data` is bytes in logical order whatever the strides.

    >>> data = serialize(_flatten({"w": torch.ones(2, 3)}))
    """
    _check_tensor_dict(tensors)
    return {prepared.name: {"dtype": _dtype_name(tensors[prepared.name]), "shape": tensors[prepared.name].shape,
                            "data": b"".join(tensor_chunks(prepared.load()))}
            for prepared in api.prepare_tensors(tensors)}


def _flatten_as_ptr(tensors: Dict[str, torch.Tensor], keep_alive_buffer: List) -> Dict[str, TensorSpec]:
    """Tensors as safetensors 0.8's `serialize` takes them: name -> TensorSpec.

    Each spec points at the tensor's bytes in C order (a copy for tensors that
    are not contiguous or not on the CPU); the arrays pointed at are appended to
    `keep_alive_buffer`, which must outlive the `serialize` call.

    >>> keep = []
    >>> data = serialize(_flatten_as_ptr({"w": torch.ones(2, 3)}, keep))
    """
    _check_tensor_dict(tensors)
    specs = {}
    for prepared in api.prepare_tensors(tensors):
        value = prepared.load()
        array = np.ascontiguousarray(value.data if isinstance(value, RawTensor) else value)
        keep_alive_buffer.append(array)
        tensor = tensors[prepared.name]
        specs[prepared.name] = TensorSpec(dtype=_dtype_name(tensor), shape=tensor.shape,
                                          data_ptr=array.ctypes.data, data_len=array.nbytes)
    return specs


# --- training state -------------------------------------------------------------

# The parts of a run that have a state_dict, in the order they are restored.
_TRAINING_PARTS = ("model", "optimizer", "scheduler", "scaler")


def training_state(model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None,
                   extra: Any = None) -> Dict[str, Any]:
    """Everything a run needs to resume, as a plain tree that `split_state` stores without pickle.

    The tree holds ``model``, ``optimizer``, ``scheduler`` and ``scaler`` (their
    ``state_dict()``; the parts not given are left out), ``rng`` and ``extra``
    (anything storable: epoch, data-loader position, ...). ``rng`` holds Python's
    `random`, numpy's legacy global generator (``np.random.seed``/``np.random.*``),
    torch's CPU generator and, once CUDA is initialized, every CUDA device's.
    ``np.random.default_rng()`` generators have no global state: put
    ``generator.bit_generator.state`` in `extra` and assign it back on resume.

    Tensors are the live ones (no copy): save the tree before training on, or
    `snapshot` it. LR schedulers hold no functions in their state_dict
    (LambdaLR stores None for its lambdas and keeps the ones it was built with);
    a function anywhere else is refused when the tree is stored.

    >>> state = training_state(model, optimizer, scheduler, extra={"epoch": 3})
    >>> tensors, document = split_state(state)
    """
    state: Dict[str, Any] = {"model": model.state_dict()}
    for part, owner in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if owner is not None:
            state[part] = owner.state_dict()
    state["rng"] = rng_state()
    state["extra"] = extra
    return state


def restore_training_state(state: Mapping, model: torch.nn.Module, optimizer=None, scheduler=None,
                           scaler=None) -> Any:
    """Put a state from `training_state` back into freshly built objects; returns ``state["extra"]``.

    Each object given is loaded with its ``load_state_dict`` (the optimizer
    moves its state to its parameters' devices), then every RNG state present
    is restored. Build the objects as the saved run did (same model, the
    optimizer over the same parameters, a LambdaLR with the same lambdas).

    >>> state = join_state(safeckpt.load_file("state.safetensors"), json.load(open("state.json")))
    >>> extra = restore_training_state(state, model, optimizer, scheduler)
    """
    if not isinstance(state, Mapping):
        raise errors.StateFormatError(f"expected the dict made by training_state(), got {type(state).__name__}")
    owners = dict(zip(_TRAINING_PARTS, (model, optimizer, scheduler, scaler)))
    for part, owner in owners.items():
        if owner is not None and not isinstance(state.get(part), Mapping):
            held = ", ".join(sorted(str(key) for key in state))
            raise errors.StateFormatError(
                f"the training state has no {part!r} part (it holds: {held}); pass {part}=None, "
                f"or save it with training_state(..., {part}=...)")
    model.load_state_dict(state["model"])
    for part, owner in owners.items():
        if part != "model" and owner is not None:
            # a copy: LambdaLR.load_state_dict pops keys from the dict it is given
            owner.load_state_dict(dict(state[part]))
    if "rng" in state:
        set_rng_state(state["rng"])
    return state.get("extra")


def rng_state() -> Dict[str, Any]:
    """The global random generators' states: Python's, numpy's legacy one, torch's (and CUDA's once used).

    >>> saved = rng_state(); torch.rand(3); set_rng_state(saved)   # the same draws again
    """
    version, internal, gauss_next = random.getstate()
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    rng: Dict[str, Any] = {
        # 624 uint32 words of the Mersenne Twister and its position (0..624)
        "python": {"version": version, "internal": np.array(internal, dtype=np.int64), "gauss_next": gauss_next},
        "numpy": {"algorithm": algorithm, "keys": keys, "pos": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    # Reading CUDA states would initialize CUDA on every device; a process that has not
    # initialized it has drawn nothing from those generators, so there is nothing to save.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: Mapping) -> None:
    """Set the global random generators to what `rng_state` gave (a part may be missing)."""
    if not isinstance(rng, Mapping):
        raise errors.StateFormatError(f"the training state's 'rng' part is a {type(rng).__name__}, not a dict")
    if "python" in rng:
        python = rng["python"]
        random.setstate((int(python["version"]), tuple(int(word) for word in python["internal"].tolist()),
                         python["gauss_next"]))
    if "numpy" in rng:
        saved = rng["numpy"]
        np.random.set_state((saved["algorithm"], np.asarray(saved["keys"], dtype=np.uint32), int(saved["pos"]),
                             int(saved["has_gauss"]), float(saved["cached_gaussian"])))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng:
        _set_cuda_rng_states(list(rng["cuda"]))


def _set_cuda_rng_states(states: List[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        warnings.warn(f"the checkpoint holds RNG states for {len(states)} CUDA device(s) but CUDA is not "
                      "available here; they were not restored", stacklevel=3)
        return
    count = torch.cuda.device_count()
    if count != len(states):
        warnings.warn(f"the checkpoint holds RNG states for {len(states)} CUDA device(s) and this machine "
                      f"has {count}; restored the first {min(count, len(states))}", stacklevel=3)
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state.cpu(), index)
