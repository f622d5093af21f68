"""Training folders made pickle-free: a Hugging Face ``Trainer`` checkpoint or an accelerate ``save_state``.

A ``transformers.Trainer`` checkpoint (``checkpoint-500/``) keeps its weights in
``model.safetensors`` but everything else it needs to resume in pickles:
``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth`` and
``training_args.bin`` (a pickled ``TrainingArguments``, which ``torch.load`` can only
read by importing transformers and building it). accelerate's ``save_state`` writes
``optimizer.bin``, ``scheduler.bin``, ``sampler.bin``, ``random_states_*.pkl`` and
``custom_checkpoint_*.pkl``, all pickles (torch zips, whatever their suffix).

`convert_folder(src, dst)` writes a folder in which nothing is a pickle:

* the model (``model.safetensors``, ``pytorch_model.bin``, a sharded model) goes
  through `ops.convert.convert`, which also copies the folder's other files
  (``config.json``, ``trainer_state.json``, tokenizer files);
* every other pickle ``NAME.EXT`` is scanned (a malicious one is refused unless
  `allow_unsafe_structure`; nothing is ever run), read with `safe_load`, and written as
  ``NAME.safetensors`` (its tensors) + ``NAME.json`` (the rest, in the document format
  of `safeckpt.training.split_state`), so that
  ``join_state(safeckpt.torch.load_file("NAME.safetensors"), json.load(open("NAME.json")))``
  gives back the same tree: optimizer and scheduler state dicts with their int keys and
  tuples, RNG states, numpy arrays;
* an object of a class that is not plain data (``TrainingArguments``, its enums) is
  never built; it is written as what the file says of it, ``{"__class__":
  "transformers.training_args.TrainingArguments", "state": [{...its fields...}]}``
  (with ``args``/``kwargs``/``items``/``setitems`` when it has them), and a bare
  reference to a class as ``{"__global__": "module.Name"}``;
* other safetensors files are copied as they are.

Every pickle is scanned before anything is written, and every file is written
atomically; a failure removes the files this run added (one it replaced, with `overwrite`,
keeps its new content whole). An output that exists is replaced only with `overwrite`.
"""

from __future__ import annotations

import argparse
import json
import types
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .. import errors
from ..format.atomic import atomic_output, write_all

__all__ = ["convert_folder", "FolderReport", "StateFile", "is_training_folder", "plain_state"]

# Dict keys a state tree holds as they are (any other is stored as its bounded repr).
_KEYS = (str, int, float, bool, bytes, type(None))
# What a file is by its first bytes: a pickle-based torch file (or a plain pickle) is converted.
_PICKLED = frozenset({"zip", "pickle", "tar"})


@dataclass
class StateFile:
    """One pickle turned into ``NAME.safetensors`` + ``NAME.json``."""

    source: str
    source_format: str
    outputs: list[str]
    tensors: int
    scan_verdict: str
    objects: list[str] = field(default_factory=list)  # classes never built, kept as what the file says


@dataclass
class FolderReport:
    """What `convert_folder` wrote: the model's conversion, each state file, the files copied."""

    source: str
    model: Any  # the model's ConvertReport, or None for a folder without a model
    states: list[StateFile]
    copied: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        model = list(self.model.outputs) + ([self.model.index] if self.model.index else []) if self.model else []
        return model + [out for state in self.states for out in state.outputs] + list(self.copied)

    def to_dict(self) -> dict:
        return {"source": self.source, "model": self.model.to_dict() if self.model else None,
                "states": [asdict(state) for state in self.states], "copied": list(self.copied),
                "outputs": self.outputs, "seconds": self.seconds, "notes": list(self.notes)}


def is_training_folder(path: "os.PathLike | str") -> bool:
    """True for a folder holding pickles beside (or instead of) its model: optimizer, scheduler, RNG states."""
    from ..ops.convert import state_files

    path = os.fspath(path)
    return os.path.isdir(path) and bool(state_files(path))


def convert_folder(src: "os.PathLike | str", dst: "os.PathLike | str", *, allow_unsafe_structure: bool = False,
                   overwrite: bool = False, verify: bool = False, source_hash: bool = True,
                   progress: Optional[Callable[[int, int, str], None]] = None, **model_options: Any) -> FolderReport:
    """Write `src`, a training checkpoint folder, as a folder `dst` with no pickle in it.

    `model_options` (``dtype``, ``shard_size``, ``select``, ...) apply to the model, as in
    `ops.convert.convert`. See the module docstring for what each file becomes.

    >>> report = convert_folder("checkpoint-500", "safe-checkpoint-500")
    >>> [state.outputs for state in report.states]
    [['optimizer.safetensors', 'optimizer.json'], ...]
    """
    from ..ops.convert import convert, model_files_of, state_files
    from ..ops.scan.guard import check_safety

    started = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise errors.SafeckptError("is not a folder", path=src)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise errors.OutputExistsError("is a file; a folder is converted into a folder", path=dst)
    if os.path.isdir(dst) and os.path.samefile(src, dst):
        raise errors.OutputIsInputError("is the folder being converted; choose another output", path=dst)
    model_files = model_files_of(src)
    names = state_files(src, model_files)
    plans = _plan_outputs(src, dst, names, overwrite)
    # every pickle is scanned before anything is written: a malicious one stops the run here
    verdicts = {name: check_safety([os.path.join(src, name)], allow_unsafe_structure, "convert").verdict
                for name in names}
    os.makedirs(dst, exist_ok=True)
    existing = set(os.listdir(dst))
    written: list[str] = []
    try:
        model = None
        if model_files:
            model = convert(src, dst, allow_unsafe_structure=allow_unsafe_structure, overwrite=overwrite,
                            verify=verify, source_hash=source_hash, progress=progress, **model_options)
            written += list(model.outputs) + ([model.index] if model.index else []) + list(model.copied)
        copied = _copy_others(src, dst, model_files, set(names), overwrite, written, copy_plain=model is None)
        states = []
        for name in names:
            states.append(_convert_state(os.path.join(src, name), plans[name], verdicts[name], source_hash, written))
    except BaseException:
        for path in written:  # what this run added; a file it replaced (overwrite) keeps its new content
            if os.path.basename(path) not in existing and os.path.isfile(path):
                os.unlink(path)
        raise
    copied = (list(model.copied) if model else []) + copied
    notes = [f"{state.source}: {len(state.objects)} objects of classes that are not data were kept as what the "
             f"file says of them, never built ({', '.join(state.objects[:3])}"
             f"{', ...' if len(state.objects) > 3 else ''})" for state in states if state.objects]
    return FolderReport(source=src, model=model, states=states, copied=copied,
                        seconds=time.perf_counter() - started, notes=notes)


def _plan_outputs(src: str, dst: str, names: list[str], overwrite: bool) -> dict[str, tuple[str, str]]:
    """NAME.EXT -> (dst/NAME.safetensors, dst/NAME.json); a clash or an existing output is refused up front."""
    plans, taken = {}, {}
    inputs = set(os.listdir(src))
    for name in names:
        stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
        outs = (os.path.join(dst, stem + ".safetensors"), os.path.join(dst, stem + ".json"))
        for out in outs:
            base = os.path.basename(out)
            if base in taken or (base in inputs and base != name):
                clash = f"written for {taken[base]}" if base in taken else f"a file of {src}"
                raise errors.OutputExistsError(f"would be written for {name} but is also {clash}: rename one of "
                                               "them first; nothing was written", path=out)
            taken[base] = name
            if os.path.exists(out) and not overwrite:
                raise errors.OutputExistsError("already exists; nothing was read or written. Replace it with "
                                               "overwrite=True (--force), or choose another output", path=out)
        plans[name] = outs
    return plans


def _copy_others(src: str, dst: str, model_files: set[str], pickled: set[str], overwrite: bool,
                 written: list[str], copy_plain: bool) -> list[str]:
    """Copy the safetensors files that are not the model, and (`copy_plain`, when there is no model
    for `convert` to copy them beside) every other file that is not a pickle."""
    from ..ops.convert import sniffed

    copied = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        path = os.path.join(src, entry.name)
        if not entry.is_file(follow_symlinks=False) or entry.name in pickled or os.path.abspath(path) in model_files:
            continue
        kind = sniffed(path)
        if kind in _PICKLED or kind == "npy" or (kind != "safetensors" and not copy_plain):
            continue
        target = os.path.join(dst, entry.name)
        if os.path.exists(target) and not overwrite:
            raise errors.OutputExistsError("already exists; replace it with overwrite=True (--force)", path=target)
        with open(path, "rb") as source, atomic_output(target) as fd:
            while True:
                chunk = source.read(1 << 22)
                if not chunk:
                    break
                write_all(fd, memoryview(chunk))
        written.append(target)
        copied.append(target)
    return copied


def _convert_state(path: str, outputs: tuple[str, str], verdict: str, source_hash: bool,
                   written: list[str]) -> StateFile:
    from .. import api
    from ..sources import open_source
    from ..training.state import split_state
    from .unpickle import safe_load

    with open_source(path) as source:
        source_format = source.format
    objects: list[str] = []
    tree = plain_state(safe_load(path, map_location="cpu", mmap=True), objects)
    tensors, document = split_state(tree)
    metadata = {"format": "pt", "safeckpt.source": os.path.basename(path), "safeckpt.source_format": source_format}
    if source_hash:
        metadata["safeckpt.source_sha256"] = _sha256(path)
    tensor_path, json_path = outputs
    api.save_file(tensors, tensor_path, metadata)
    written.append(tensor_path)
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    with atomic_output(json_path) as fd:
        write_all(fd, memoryview(text.encode("utf-8")))
    written.append(json_path)
    return StateFile(source=path, source_format=source_format, outputs=[tensor_path, json_path],
                     tensors=len(tensors), scan_verdict=verdict, objects=sorted(set(objects)))


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain_state(value: Any, objects: Optional[list] = None) -> Any:
    """`value` (from `safe_load`) with what a state tree cannot hold made into data.

    Placeholders for classes never built become ``{"__class__": qualname, ...}`` and
    ``{"__global__": qualname}`` (their qualnames are appended to `objects`); sets
    become sorted lists, complex numbers numpy scalars, dtypes and devices their names,
    paths their text, anything else its bounded repr ``{"__repr__": ...}``.
    """
    import torch

    from ..sources.pickle_records import HugeInt, Placeholder, PlaceholderCall, brief
    from ..training.state import kept_kind

    found = [] if objects is None else objects
    done: dict[int, Any] = {}

    def walk(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str, bytes, np.ndarray, np.generic, torch.Tensor)):
            return x
        if id(x) in done:
            return done[id(x)]
        if isinstance(x, PlaceholderCall):
            name = _qualname(x.func)
            found.append(name)
            out: Any = {"__class__": name}
            for key in ("args", "kwargs", "state", "items", "setitems"):
                part = getattr(x, key)
                if part:
                    out[key] = walk(list(part) if key != "kwargs" else part)
        elif isinstance(x, Placeholder):
            found.append(x.qualname)
            out = {"__global__": x.qualname}
        elif isinstance(x, dict):
            items = {key if isinstance(key, _KEYS) else brief(key): walk(item) for key, item in x.items()}
            if type(x) is OrderedDict:
                out = OrderedDict(items)
                if hasattr(x, "_metadata"):
                    out._metadata = walk(x._metadata)
            else:
                out = type(x)(items) if kept_kind(x) is not None else items
        elif isinstance(x, (argparse.Namespace, types.SimpleNamespace)):
            parts = {key: walk(item) for key, item in vars(x).items()}
            out = argparse.Namespace(**parts) if isinstance(x, argparse.Namespace) else parts
        elif kept_kind(x) is not None:
            out = x  # OmegaConf configs and torch.Size: plain data throughout
        elif isinstance(x, list):
            out = [walk(v) for v in x]
        elif isinstance(x, tuple):
            out = tuple(walk(v) for v in x)
        elif isinstance(x, (set, frozenset)):
            out = [walk(v) for v in sorted(x, key=brief)]
        elif isinstance(x, complex):
            out = np.complex128(x)
        elif isinstance(x, bytearray):
            out = bytes(x)
        elif isinstance(x, (torch.dtype, torch.device, np.dtype)):
            out = str(x)
        elif isinstance(x, os.PathLike):
            out = os.fspath(x)
        elif isinstance(x, HugeInt):
            out = {"__int__": repr(x)}
        elif isinstance(x, type):
            out = x  # a class (hparams_type): stored by name
        else:
            out = {"__repr__": brief(x)}
        done[id(x)] = out
        return out

    return walk(value)


def _qualname(func: Any) -> str:
    from ..sources.pickle_records import Placeholder, PlaceholderCall

    if isinstance(func, Placeholder):
        return func.qualname
    if isinstance(func, PlaceholderCall):
        return _qualname(func.func) + "()"
    if isinstance(func, type):
        return f"{func.__module__}.{func.__qualname__}"
    return type(func).__name__
