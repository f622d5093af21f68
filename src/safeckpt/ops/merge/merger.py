"""merge: several checkpoints -> one safetensors model, streamed one tensor at a time.

The math of each method is in `merge_methods`; this module opens the inputs,
decides what each output tensor is made of, and streams the results through the
safetensors sink (`sinks.safetensors`), one tensor and one block of it at a time.

Inputs
    Any format `open_source` reads, mixed freely. Each is scanned first, like a
    conversion: a malicious file is refused (`UnsafeFileError`) unless
    `allow_unsafe_structure` (nothing in it is ever executed either way). Lightning
    and Stable Diffusion checkpoints merge by their ``state_dict`` names
    (``choose_tensors(extract="auto")``), so a ``.ckpt`` and a ``.safetensors`` of
    one model line up. Names only in the base model are not written (noted).

Compatibility
    A tensor must have one shape in every input (and the base), and be floating in
    all or none of them; otherwise `IncompatibleInputsError` lists the offenders
    (name: dtype and shape per input; the first 20 and a count). A name missing from
    some inputs (or from the base) is an `IncompatibleInputsError` too, unless
    `allow_missing`: then it is merged over the inputs that have it --
    linear weights are renormalised over them to sum to 1 (used as given with
    ``normalize=False``), ema runs over them in order, a task-vector method treats a
    model without the tensor as unchanged from the base (its task vector is 0),
    slerp of a tensor only one model has is that model's tensor, and a tensor the
    base lacks is taken from the first input that has it.

What is merged
    Floating tensors (F64, F32, F16, BF16, F8, F4). Everything else -- integer step
    counters and position ids, bool masks, complex, F6 -- is taken from the first
    input that has it, unchanged; if the inputs disagree on its values the report
    lists it in `differing`.

Dtypes
    The arithmetic runs in float32, or float64 when any input (or the base) holds
    the tensor in F64. The result is written in the first input's dtype for that
    tensor (inputs that disagree are noted), or cast to `dtype` with `ops.cast`'s
    rules (overflow counted, F8_E4M3 saturating) -- floating tensors only.

Tied weights
    Names tied in some input (the sources' aliases, the same storage, or a
    safetensors file's ``dropped -> kept`` metadata entries as ``save_model``
    writes them) form a tie group, which stays tied unless an input holds two of
    its names with different values. An input holding only some of the group's
    names (a file that stores the tie once, as transformers writes it) is read for
    the others from the name it holds, so the group is merged over the same
    inputs, once, and written once, under its first name in the inputs' order (the
    name transformers keeps); each dropped name is recorded in the metadata as
    ``dropped -> kept``, as ``safetensors.torch.save_model`` and `convert` do.

Streaming and memory
    Output tensors are computed when the sink asks for their bytes: each input's
    tensor is read in blocks of `BLOCK_ELEMENTS` (pread from the file where its
    bytes lie as-is, else views of the mapped source), combined in the accumulation
    dtype, cast, and written; a small thread pool computes blocks ahead of the
    writer (numpy and pread release the GIL), each with buffers it reuses block
    after block (a fresh array costs a page fault per 4 KiB: six times the
    arithmetic of a linear merge). Slerp first sums the dot product and
    norms over the blocks; ties first finds each task vector's magnitude threshold
    by radix selection over the blocks (`merge_methods.KthLargest`: two more passes
    per input for float32), so no method holds a whole tensor: memory is a few
    blocks per input. Each input's pages of a tensor are released once it is
    written. DARE's draws are made in element order on the calling thread, so
    results do not depend on the block size or the threads.

Output
    A file or a sharded Hugging Face layout (`shard_size`), written atomically by the
    sink. Metadata: ``format: "pt"``, ``safeckpt.version``, then ``safeckpt.merge``:
    compact JSON of the method, its parameters (weights, normalize, decay, t,
    lambda, density, seed -- those that apply), the inputs' and base's file names
    (basenames) and the cast, then the caller's `metadata`, then tied-name entries.

>>> report = merge(["run1/model.safetensors", "run2/model.ckpt"], "soup.safetensors")
>>> report.merged, report.outputs
(291, ['soup.safetensors'])
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from ... import errors
from ..._version import __version__
from ...errors import IncompatibleInputsError
from ...format import writer
from ...format.dtypes import DTYPES
from ...format.storage import read_exactly
from ...sources.base import TensorInfo, TensorSource
from .. import cast as casting
from . import methods as mm
from ..destination import check_destination
from ..scan.guard import check_safety, open_checked
from ..layout import tie_groups
from ..selection import choose_tensors, first_items, tied_names
from ...sinks.safetensors import OutputTensor, write_safetensors

__all__ = ["merge", "MergeReport", "METHODS", "DEFAULT_DENSITY"]

METHODS = ("linear", "ema", "slerp", "task-arithmetic", "ties", "dare")
TASK_METHODS = frozenset({"task-arithmetic", "ties", "dare"})
# TIES' paper keeps the top 20% of each task vector; DARE works from far sparser (10%
# on LLMs), so 0.2 is the common, safe lead for both.
DEFAULT_DENSITY = 0.2
DEFAULT_T = 0.5
DEFAULT_LAMBDA = 1.0
DEFAULT_SEED = 0
METADATA_KEY = "safeckpt.merge"

# Elements combined at a time (even, so that F4 blocks pack whole bytes): a few MiB
# per input, which keeps each block's passes in cache and memory at a few blocks.
BLOCK_ELEMENTS = 256 * 1024
# Threads computing blocks ahead of the writer, and blocks in flight: both cores busy
# (numpy's loops and pread release the GIL) while memory stays a few blocks.
WORKERS = max(1, min(4, os.cpu_count() or 1))
LOOKAHEAD = 2 * WORKERS + 2
# Offenders listed in an incompatibility error (all are in `.offenders`).
LISTED_OFFENDERS = 20


@dataclass
class MergeReport:
    """What a merge did; `to_dict` for JSON."""

    method: str
    inputs: list[str]
    base: Optional[str]
    parameters: dict[str, Any]
    outputs: list[str]
    index: Optional[str]
    tensors: int  # written
    merged: int  # computed by the method (the others were copied from one input)
    copied: list[str]  # written as one input holds them (non-floating, or in one input only)
    missing: dict[str, list[str]]  # tensor -> inputs lacking it (with allow_missing)
    differing: list[str]  # copied tensors whose values differ across the inputs
    aliases: dict[str, str]  # dropped name -> the kept name holding the same values
    cast: Optional[str]
    overflow: dict[str, int]  # tensor -> finite values that overflowed the written dtype
    bytes_written: int
    verified: bool
    seconds: float
    scan_verdicts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- public API ----------------------------------------------------------------------

def merge(sources: Sequence["os.PathLike | str | TensorSource"], dst: "os.PathLike | str",
          method: str = "linear", weights: Optional[Sequence[float]] = None, *,
          base: "os.PathLike | str | TensorSource | None" = None, normalize: Optional[bool] = None,
          decay: Optional[float] = None, t: Optional[float] = None, lambda_: Optional[float] = None,
          density: Optional[float] = None, seed: Optional[int] = None, dtype: Optional[str] = None,
          allow_missing: bool = False, shard_size: "int | str | None" = None, extract: Optional[str] = "auto",
          allow_unsafe_structure: bool = False, metadata: Optional[dict[str, str]] = None,
          verify: bool = False, progress: Optional[Callable[[int, int, str], None]] = None,
          overwrite: bool = False) -> MergeReport:
    """Merge checkpoints (any format safeckpt reads) into one safetensors model at `dst`.

    `method` is "linear" (weighted average, uniform by default, `weights` normalised
    unless ``normalize=False``), "ema" (ordered inputs, `decay` required), "slerp"
    (two inputs, `t` default 0.5), or with a `base` model "task-arithmetic"
    (`lambda_`, default 1), "ties" and "dare" (`density` default 0.2, `lambda_`;
    dare's draws from `seed`, default 0); `weights` scale the task vectors there
    (default 1 each). `dtype` casts the floating outputs ("bf16", "fp16", ...).
    `dst` is a file or directory; `shard_size` ("5GB") shards it. See the module
    docstring for missing tensors, dtypes, ties and the metadata written. `dst` is
    never one of the inputs (or the base); an existing `dst` is replaced only with
    `overwrite`; both are checked before anything is read.

    >>> merge(["a.safetensors", "b.pt", "c.ckpt"], "avg.safetensors", weights=[0.5, 0.3, 0.2]).merged
    198
    >>> merge(["ft1.pt", "ft2.pt"], "out.safetensors", "ties", base="base.pt", density=0.3).method
    'ties'
    """
    started = time.perf_counter()
    sources = list(sources)
    spec = _Spec.make(method, len(sources), weights=weights, base=base is not None, normalize=normalize,
                      decay=decay, t=t, lambda_=lambda_, density=density, seed=seed)
    target = casting.target_dtype(dtype) if dtype is not None else None
    user_metadata = writer.check_metadata(metadata, dst)
    check_destination(sources + ([base] if base is not None else []), dst, overwrite=overwrite,
                      sharded=shard_size is not None)
    notes: list[str] = []
    verdicts: dict[str, str] = {}
    opened: list[TensorSource] = []
    try:
        inputs = [_Input.open(src, k, extract, allow_unsafe_structure, opened, verdicts, notes)
                  for k, src in enumerate(sources)]
        base_input = _Input.open(base, -1, extract, allow_unsafe_structure, opened, verdicts, notes) \
            if base is not None else None
        _expand_metadata_aliases(inputs + ([base_input] if base_input else []))
        plan = _plan(inputs, base_input, spec, target, allow_missing, notes)
        with _Run(spec) as run:
            tensors = [run.output(p) for p in plan.tensors]
            result = write_safetensors(tensors, dst, metadata=_metadata(spec, inputs, base_input, target,
                                                                        user_metadata, plan.aliases),
                                       shard_size=shard_size, verify=verify, progress=progress)
    finally:
        for source in opened:
            source.close()

    if run.overflow:
        total = sum(run.overflow.values())
        warnings.warn(f"{total} finite values in {len(run.overflow)} merged tensors overflowed their dtype "
                      f"(now ±inf, or ±max for F8_E4M3): {first_items(run.overflow)}", RuntimeWarning,
                      stacklevel=2)
    differing = [p.name for p in plan.tensors if p.name in run.differing]
    if differing:
        notes.append(f"{len(differing)} non-floating tensors differ across the inputs; the first input's "
                     f"values were written: {first_items(differing)}")
    return MergeReport(
        method=spec.method, inputs=[i.path for i in inputs], base=base_input.path if base_input else None,
        parameters=spec.parameters(), outputs=result.outputs, index=result.index, tensors=len(plan.tensors),
        merged=sum(1 for p in plan.tensors if p.merged), copied=[p.name for p in plan.tensors if not p.merged],
        missing=plan.missing, differing=differing, aliases=dict(plan.aliases), cast=target,
        overflow=dict(run.overflow), bytes_written=result.bytes_written, verified=bool(verify),
        seconds=time.perf_counter() - started, scan_verdicts=verdicts, notes=notes)


# --- the method and its parameters -----------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    """A method with its checked parameters (None where they do not apply)."""

    method: str
    count: int
    weights: Optional[tuple[float, ...]]
    normalize: Optional[bool]
    decay: Optional[float]
    t: Optional[float]
    lam: Optional[float]
    density: Optional[float]
    seed: Optional[int]

    @classmethod
    def make(cls, method: str, count: int, *, weights, base: bool, normalize, decay, t, lambda_, density,
             seed) -> "_Spec":
        name = str(method).strip().lower().replace("_", "-")
        if name not in METHODS:
            raise errors.SafeckptError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
        given = {"weights": weights, "normalize": normalize, "decay": decay, "t": t, "lambda": lambda_,
                 "density": density, "seed": seed}
        allowed = {"linear": {"weights", "normalize"}, "ema": {"decay"}, "slerp": {"t"},
                   "task-arithmetic": {"weights", "lambda"}, "ties": {"weights", "lambda", "density"},
                   "dare": {"weights", "lambda", "density", "seed"}}[name]
        wrong = [k for k, v in given.items() if v is not None and k not in allowed]
        if wrong:
            raise errors.SafeckptError(f"{', '.join(wrong)} do{'es' if len(wrong) == 1 else ''} not apply to "
                                       f"{name} (it takes {', '.join(sorted(allowed))})")
        if count < 1:
            raise errors.SafeckptError("nothing to merge: give at least one input")
        if name == "slerp" and count != 2:
            raise errors.SafeckptError(f"slerp interpolates exactly two models; {count} were given")
        if name in TASK_METHODS and not base:
            raise errors.SafeckptError(f"{name} needs the base model the inputs were fine-tuned from (base=)")
        if name not in TASK_METHODS and base:
            raise errors.SafeckptError(f"{name} takes no base model (only {', '.join(sorted(TASK_METHODS))} do)")
        if name == "ema" and decay is None:
            raise errors.SafeckptError("ema needs a decay in [0, 1], e.g. 0.9")
        w = tuple(mm.linear_weights(count, weights, normalize=False).tolist()) if weights is not None else None
        if name == "linear":
            normalize = True if normalize is None else bool(normalize)
            mm.linear_weights(count, w, normalize=normalize)  # refuses weights that sum to 0
        if name == "ema":
            mm.ema_weights(count, decay)
        if name == "slerp":
            t = DEFAULT_T if t is None else t
            mm.slerp_weights(0.0, 1.0, 1.0, t)
        if name in TASK_METHODS:
            lambda_ = DEFAULT_LAMBDA if lambda_ is None else lambda_
            if isinstance(lambda_, bool) or not isinstance(lambda_, numbers.Real) or not math.isfinite(lambda_):
                raise errors.SafeckptError(f"lambda must be a finite number, got {lambda_!r}")
        if name in ("ties", "dare"):
            density = DEFAULT_DENSITY if density is None else density
            mm.ties_threshold(np.zeros(0), density)  # refuses a density outside (0, 1]
        if name == "dare":
            seed = DEFAULT_SEED if seed is None else seed
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise errors.SafeckptError(f"seed must be a non-negative integer, got {seed!r}")
            seed = int(seed)
        return cls(name, count, w, normalize, float(decay) if decay is not None else None,
                   float(t) if t is not None else None, float(lambda_) if lambda_ is not None else None,
                   float(density) if density is not None else None, seed)

    def parameters(self) -> dict[str, Any]:
        """The parameters that apply, by the names the CLI and the metadata use."""
        values = {"weights": list(self.weights) if self.weights is not None else None,
                  "normalize": self.normalize, "decay": self.decay, "t": self.t, "lambda": self.lam,
                  "density": self.density, "seed": self.seed}
        return {k: v for k, v in values.items() if v is not None}

    def member_weights(self, positions: list[int]) -> tuple[list[float], Optional[float]]:
        """The weights of the inputs at `positions` (those that hold a tensor), and the total
        a linear merge divides by (None: no division)."""
        if self.method == "ema":
            return mm.ema_weights(len(positions), self.decay).tolist(), None
        chosen = [self.weights[k] for k in positions] if self.weights is not None else [1.0] * len(positions)
        if self.method == "linear" and self.normalize:
            mm.linear_weights(len(chosen), chosen)  # refuses weights that sum to 0
            return chosen, float(sum(chosen))
        return chosen, None


# --- the inputs ----------------------------------------------------------------------

@dataclass
class _Input:
    """One opened input (or the base, position -1): output name -> source name."""

    path: str
    position: int
    source: TensorSource
    names: dict[str, str]
    tied: dict[str, str]

    @classmethod
    def open(cls, src, position: int, extract: Optional[str], allow_unsafe: bool, opened: list,
             verdicts: dict[str, str], notes: list[str]) -> "_Input":
        if isinstance(src, TensorSource):
            source = src
        else:
            source = open_checked(src, allow_unsafe, "merge")
            opened.append(source)
        report = check_safety(source.files(), allow_unsafe, "merge")
        if report is not None:
            verdicts[source.path] = report.verdict
            if report.verdict != "safe":
                notes.append(f"the scan found {source.path} {report.verdict} ({len(report.findings)} findings); "
                             "nothing in it was executed")
        choice = choose_tensors(source, extract=extract)
        notes.extend(f"{source.path}: {note}" for note in list(source.notes) + choice.notes)
        return cls(source.path, position, source, choice.names, tied_names(source, choice))

    def info(self, name: str) -> TensorInfo:
        return self.source.infos[self.names[name]]


# --- planning ------------------------------------------------------------------------

@dataclass
class _Member:
    """One input's copy of an output tensor."""

    input: _Input
    name: str  # in the source
    info: TensorInfo


@dataclass
class _TensorPlan:
    name: str
    dtype: str  # written
    shape: tuple[int, ...]
    members: list[_Member]  # the inputs holding it, in input order
    base: Optional[_Member]
    merged: bool  # computed by the method; else copied from members[0]
    weights: list[float]
    total: Optional[float]  # linear: the weights' sum, divided by
    accumulate: np.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Plan:
    tensors: list[_TensorPlan]
    missing: dict[str, list[str]]
    aliases: dict[str, str]


def _mergeable(dtype: str) -> bool:
    return casting.is_floating(dtype) and DTYPES[dtype].numpy is not None


def _plan(inputs: list[_Input], base: Optional[_Input], spec: _Spec, target: Optional[str], allow_missing: bool,
          notes: list[str]) -> _Plan:
    order: dict[str, None] = {}
    for inp in inputs:
        for name in inp.names:
            order.setdefault(name)
    aliases = _shared_aliases(inputs, base, order, notes)
    mismatched, missing, no_base, mixed = [], {}, [], []
    plans = []
    for name in order:
        if name in aliases:
            continue
        members = [_Member(i, i.names[name], i.info(name)) for i in inputs if name in i.names]
        held = members + ([_Member(base, base.names[name], base.info(name))] if base and name in base.names else [])
        if len({tuple(m.info.shape) for m in held}) > 1 or len({_mergeable(m.info.dtype) for m in held}) > 1:
            mismatched.append(f"{name}: " + ", ".join(f"{_label(m.input)} {m.info.dtype}{list(m.info.shape)}"
                                                      for m in held))
            continue
        if len(members) < len(inputs):
            missing[name] = [i.path for i in inputs if name not in i.names]
        if base is not None and name not in base.names and _mergeable(members[0].info.dtype):
            no_base.append(name)
        plans.append(_plan_tensor(name, members, held[-1] if len(held) > len(members) else None, spec, target))
        if len({m.info.dtype for m in held}) > 1:
            mixed.append(f"{name} ({', '.join(m.info.dtype for m in held)})")
    if mismatched:
        raise IncompatibleInputsError(
            f"cannot merge: {_count(mismatched, 'tensor differs', 'tensors differ')} in shape (or are floating in "
            "some inputs only): "
            + _listing(mismatched), offenders=mismatched)
    if (missing or no_base) and not allow_missing:
        lines = [f"{name}: missing from {', '.join(paths)}" for name, paths in missing.items()] \
            + [f"{name}: missing from the base {base.path}" for name in no_base]
        raise IncompatibleInputsError(
            f"cannot merge: {_count(lines, 'tensor is', 'tensors are')} not in every input: {_listing(lines)}; "
            "pass allow_missing "
            "(--allow-missing) to merge each over the inputs that have it", offenders=lines)
    if no_base:
        notes.append(f"{len(no_base)} tensors are not in the base; taken from the first input holding them: "
                     f"{first_items(no_base)}")
    if mixed:
        notes.append(f"{len(mixed)} tensors have different dtypes across the inputs; written in the first "
                     f"input's dtype{' (before the cast)' if target else ''}: {first_items(mixed)}")
    if base is not None:
        extra = [name for name in base.names if name not in order]
        if extra:
            notes.append(f"{len(extra)} tensors only in the base are not written: {first_items(extra)}")
    return _Plan(plans, missing, aliases)


def _plan_tensor(name: str, members: list[_Member], base: Optional[_Member], spec: _Spec,
                 target: Optional[str]) -> _TensorPlan:
    first = members[0].info
    floating = _mergeable(first.dtype)
    merged = floating and (base is not None if spec.method in TASK_METHODS else
                           len(members) > 1 or spec.method != "slerp")
    dtype = target if target is not None and casting.is_floating(first.dtype) else first.dtype
    try:
        weights, total = spec.member_weights([m.input.position for m in members]) if merged else ([], None)
    except errors.SafeckptError as exc:  # weights of the inputs holding it that sum to 0
        raise errors.SafeckptError(f"{exc.detail} (over the inputs holding this tensor)", tensor=name) from None
    held = members + ([base] if base is not None else [])
    accumulate = mm.accumulation_dtype(DTYPES[m.info.dtype].numpy for m in held) if merged else np.dtype(np.float32)
    return _TensorPlan(name, dtype, tuple(first.shape), members, base, merged, weights, total, accumulate)


def _expand_metadata_aliases(inputs: list[_Input]) -> None:
    """A safetensors file written by ``save_model`` (or `convert`) stores tied weights once and
    records ``dropped -> kept`` in its metadata: give it the dropped name back, tied, where
    another input holds a tensor by that name (so a stray metadata value is never a tensor)."""
    for inp in inputs:
        others = {name for other in inputs if other is not inp for name in other.names}
        for dropped, kept in (inp.source.metadata or {}).items():
            if dropped not in inp.names and kept in inp.names and dropped in others:
                inp.names[dropped] = inp.names[kept]
                inp.tied[dropped] = inp.tied.get(kept, kept)


def _shared_aliases(inputs: list[_Input], base: Optional[_Input], names: dict[str, None],
                    notes: list[str]) -> dict[str, str]:
    """Tie groups merged as one tensor: dropped -> kept, the first of `names` kept (see the module
    docstring); an input holding some of a group's names gets the others, tied to them."""
    holders = inputs + ([base] if base is not None else [])
    shared: dict[str, str] = {}
    filled: set[str] = set()
    for group in tie_groups([pair for inp in holders for pair in inp.tied.items()], names):
        held = [[name for name in group if name in inp.names] for inp in holders]
        if any(len({inp.tied.get(name, name) for name in mine}) > 1 for inp, mine in zip(holders, held)):
            continue  # an input holds two of its names with different values: each is merged on its own
        for inp, mine in zip(holders, held):
            for name in group:
                if mine and name not in inp.names:
                    inp.names[name] = inp.names[mine[0]]
                    inp.tied[name] = inp.tied.get(mine[0], mine[0])
                    filled.add(name)
        shared.update({name: group[0] for name in group[1:]})
    if filled:
        notes.append(f"{len(filled)} tied names that some inputs store once were read there from the name "
                     f"tied to them: {first_items(sorted(filled))}")
    return shared


def _label(inp: _Input) -> str:
    return "the base" if inp.position < 0 else os.path.basename(inp.path.rstrip("/" + os.sep)) or inp.path


def _count(items: list, one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def _listing(lines: list[str]) -> str:
    shown = "; ".join(lines[:LISTED_OFFENDERS])
    return shown + (f"; and {len(lines) - LISTED_OFFENDERS} more" if len(lines) > LISTED_OFFENDERS else "")


def _metadata(spec: _Spec, inputs: list[_Input], base: Optional[_Input], target: Optional[str],
              user: Optional[dict[str, str]], aliases: dict[str, str]) -> dict[str, str]:

    def name(inp: _Input) -> str:
        return os.path.basename(inp.path.rstrip("/" + os.sep)) or inp.path

    record = {"method": spec.method, **spec.parameters(), "inputs": [name(i) for i in inputs]}
    if base is not None:
        record["base"] = name(base)
    if target is not None:
        record["dtype"] = target
    meta = {"format": "pt", "safeckpt.version": __version__,
            METADATA_KEY: json.dumps(record, separators=(",", ":"), ensure_ascii=False)}
    meta.update(user or {})
    for dropped, kept in aliases.items():
        meta.setdefault(dropped, kept)
    return meta


# --- reading blocks ------------------------------------------------------------------

def _file_span(source: TensorSource, name: str) -> Optional[tuple[str, int]]:
    """``(path, offset)`` of a regular file holding the tensor's bytes as safetensors stores
    them (a shard's file for a sharded checkpoint); None where there is none."""
    span = source.file_span(name)
    if span is None or span.nbytes != source.infos[name].nbytes or not os.path.isfile(span.path):
        return None
    return span.path, span.offset


class _Reader:
    """Consecutive 1-D blocks of one input's tensor in C order: pread from the file where the
    bytes lie as-is (nothing stays mapped), else slices of the source's array."""

    def __init__(self, run: "_Run", member: _Member) -> None:
        self.member = member
        source, info = member.input.source, member.info
        self.dtype = DTYPES[info.dtype].numpy
        span = _file_span(source, member.name) if not DTYPES[info.dtype].packed else None
        self.fd = run.fd(span[0]) if span is not None else None
        self.offset = span[1] if span is not None else 0
        self.path = span[0] if span is not None else source.path
        self.flat: Optional[np.ndarray] = None
        self.array: Optional[np.ndarray] = None
        if self.fd is None:  # read on the calling thread: sources need not be thread-safe
            array = source.read_checked(member.name)
            self.array = array
            self.flat = array.reshape(-1) if array.flags.c_contiguous else None

    def block(self, start: int, stop: int, buffer: Optional[np.ndarray] = None) -> np.ndarray:
        """Elements [start, stop): read into `buffer` (of this dtype and size) where they are read."""
        if self.fd is not None:
            out = buffer if buffer is not None else np.empty(stop - start, self.dtype)
            read_exactly(self.fd, memoryview(out.view(np.uint8)), self.offset + start * self.dtype.itemsize,
                         self.path)
            return out
        if self.flat is not None:
            return self.flat[start:stop]
        return self.array.flat[start:stop]  # a strided view: only this block is copied


class _Scratch(threading.local):
    """Each thread's block buffers, reused from block to block: a fresh array costs a page
    fault per 4 KiB touched, which made a linear merge six times slower (measured)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, np.ndarray] = {}

    def get(self, slot: Any, dtype: np.dtype, n: int) -> np.ndarray:
        key = (slot, np.dtype(dtype))
        buffer = self.buffers.get(key)
        if buffer is None or buffer.size < n:
            buffer = self.buffers[key] = np.empty(max(n, BLOCK_ELEMENTS), dtype)
        return buffer[:n]


class _Recycler:
    """Block buffers handed from one thread to another (results to the writer, DARE's draws to
    a worker) and given back once used; as many exist as blocks are in flight."""

    def __init__(self) -> None:
        self._free: dict[np.dtype, list[np.ndarray]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def take(self, dtype: np.dtype, n: int) -> np.ndarray:
        """A buffer of at least `n` elements (slice it)."""
        dtype = np.dtype(dtype)
        with self._lock:
            free = self._free[dtype]
            while free:
                buffer = free.pop()
                if buffer.size >= n:
                    return buffer
        return np.empty(max(n, BLOCK_ELEMENTS), dtype)

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free[buffer.dtype].append(buffer)


# --- computing and writing -----------------------------------------------------------

class _Block(NamedTuple):
    """A computed block: the pieces to write, values that overflowed, buffers to give back after."""

    pieces: list
    overflow: int
    held: list


class _Run:
    """The thread pool, buffers, open files and findings of one merge."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="safeckpt-merge")
        self.scratch = _Scratch()
        self.recycler = _Recycler()
        self.fds: dict[str, int] = {}
        self.overflow: dict[str, int] = {}
        self.differing: set[str] = set()

    def __enter__(self) -> "_Run":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self.fds[path]

    def output(self, plan: _TensorPlan) -> OutputTensor:
        def done() -> None:
            for member in plan.members + ([plan.base] if plan.base is not None else []):
                member.input.source.release(member.name)

        if plan.merged:
            return OutputTensor(plan.name, plan.dtype, plan.shape, lambda: self._merged(plan), done=done)
        first = plan.members[0]
        simple = plan.dtype == first.info.dtype and (len(plan.members) == 1 or _mergeable(first.info.dtype))
        span = _file_span(first.input.source, first.name) if simple else None
        return OutputTensor(plan.name, plan.dtype, plan.shape, lambda: self._copied(plan), span=span, done=done)

    # -- blocks, computed ahead on the pool
    def blocks(self, n: int, compute: Callable[[int, int, Any], Any],
               prepare: Optional[Callable[[int, int], Any]] = None) -> Iterator[Any]:
        """compute(start, stop, prepare(start, stop)) for consecutive blocks, in order."""
        pending: collections.deque[Future] = collections.deque()
        try:
            for start in range(0, n, BLOCK_ELEMENTS):
                stop = min(n, start + BLOCK_ELEMENTS)
                extra = prepare(start, stop) if prepare is not None else None
                pending.append(self.pool.submit(compute, start, stop, extra))
                if len(pending) >= LOOKAHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def written(self, blocks: Iterator[_Block], name: str) -> Iterator:
        """The pieces of `blocks`; each block's buffers are recycled once its pieces are written."""
        overflow = 0
        for block in blocks:
            overflow += block.overflow
            yield from block.pieces  # the sink writes each piece before asking for the next
            for buffer in block.held:
                self.recycler.give(buffer)
        if overflow:
            self.overflow[name] = overflow  # set, not added: verify makes a second pass

    # -- a merged tensor
    def _merged(self, plan: _TensorPlan) -> Iterator[np.ndarray]:
        readers = [_Reader(self, m) for m in plan.members]
        base = _Reader(self, plan.base) if plan.base is not None else None
        kernel, prepare = self._kernel(plan, readers, base)
        dtype = plan.dtype

        def compute(start: int, stop: int, extra: Any) -> _Block:
            acc = self.recycler.take(plan.accumulate, stop - start)
            value = kernel(start, stop, acc[:stop - start], extra)
            pieces, overflow = _encode(value, dtype)
            for buffer in extra or ():
                self.recycler.give(buffer)
            if any(piece is value for piece in pieces):
                return _Block(pieces, overflow, [acc])
            self.recycler.give(acc)
            return _Block(pieces, overflow, [])

        yield from self.written(self.blocks(plan.numel, compute, prepare), plan.name)

    def _kernel(self, plan: _TensorPlan, readers: list[_Reader], base: Optional[_Reader]):
        """kernel(start, stop, out, extra) -> the block's merged values, and the `prepare` step."""
        spec, acc, w, scratch = self.spec, plan.accumulate, plan.weights, self.scratch

        def streamed(start: int, stop: int) -> Iterator[np.ndarray]:  # every input through one buffer
            return (r.block(start, stop, scratch.get("in", r.dtype, stop - start)) for r in readers)

        def base_block(start: int, stop: int) -> np.ndarray:
            return base.block(start, stop, scratch.get("base", base.dtype, stop - start))

        def temp(start: int, stop: int) -> np.ndarray:
            return scratch.get("temp", acc, stop - start)

        if spec.method in ("linear", "ema", "slerp"):
            if spec.method == "slerp":
                w = self._slerp_weights(plan, readers)
            return (lambda s, e, out, extra: mm.weighted_sum(streamed(s, e), w, acc, total=plan.total, out=out,
                                                             temp=temp(s, e))), None
        if spec.method == "task-arithmetic":
            return (lambda s, e, out, extra: mm.task_arithmetic_block(
                base_block(s, e), streamed(s, e), w, spec.lam, acc, out=out, temp=temp(s, e))), None
        if spec.method == "ties":
            thresholds = [self._ties_threshold(plan, r, base) for r in readers]

            def ties(s: int, e: int, out: np.ndarray, extra: Any) -> np.ndarray:
                blocks = [r.block(s, e, scratch.get(("in", k), r.dtype, e - s)) for k, r in enumerate(readers)]
                return mm.ties_block(base_block(s, e), blocks, w, thresholds, spec.lam, acc, out=out)

            return ties, None
        rngs = [mm.tensor_rng(spec.seed, m.input.position, plan.name) for m in plan.members]

        def draws(start: int, stop: int) -> list[np.ndarray]:  # on this thread, in element order
            n, keeps = stop - start, []
            for rng in rngs:
                keep = self.recycler.take(np.bool_, n)
                mm.dare_keep(rng, n, spec.density, out=keep[:n], draws=scratch.get("draws", np.float64, n))
                keeps.append(keep)
            return keeps

        def dare(s: int, e: int, out: np.ndarray, keeps: list[np.ndarray]) -> np.ndarray:
            return mm.dare_block(base_block(s, e), streamed(s, e), [k[:e - s] for k in keeps], w, spec.density,
                                 spec.lam, acc, out=out, temp=temp(s, e))

        return dare, draws

    def _slerp_weights(self, plan: _TensorPlan, readers: list[_Reader]) -> list[float]:
        def sums(start: int, stop: int, extra: Any) -> tuple[float, float, float]:
            n = stop - start
            a, b = (self.scratch.get(("wide", k), np.float64, n) for k in range(2))
            for wide, r in zip((a, b), readers):
                np.copyto(wide, r.block(start, stop, self.scratch.get("in", r.dtype, n)), casting="unsafe")
            return float(a @ b), float(a @ a), float(b @ b)

        dot = aa = bb = 0.0
        for d, x, y in self.blocks(plan.numel, sums):
            dot, aa, bb = dot + d, aa + x, bb + y
        return list(mm.slerp_weights(dot, math.sqrt(aa), math.sqrt(bb), self.spec.t))

    def _ties_threshold(self, plan: _TensorPlan, reader: _Reader, base: _Reader) -> float:
        select = mm.KthLargest(plan.accumulate, plan.numel, self.spec.density)

        def histogram(start: int, stop: int, extra: Any) -> np.ndarray:
            n = stop - start
            tau = self.scratch.get("temp", plan.accumulate, n)
            np.subtract(reader.block(start, stop, self.scratch.get("in", reader.dtype, n)),
                        base.block(start, stop, self.scratch.get("base", base.dtype, n)), out=tau,
                        dtype=plan.accumulate)
            return select.histogram(np.abs(tau, out=tau))

        while not select.done:  # a pass over the blocks per 16 bits of the values
            total = np.zeros(1 << select.DIGIT_BITS, np.int64)
            for counts in self.blocks(plan.numel, histogram):
                total += counts
            select.advance(total)
        return select.value

    # -- a tensor taken from one input
    def _copied(self, plan: _TensorPlan) -> Iterator:
        first = plan.members[0]
        if plan.dtype != first.info.dtype:  # a floating tensor no other input has, cast
            reader = _Reader(self, first)

            def cast(start: int, stop: int, extra: Any) -> _Block:
                values = reader.block(start, stop, self.scratch.get("in", reader.dtype, stop - start))
                return _Block(*_encode(values, plan.dtype), [])

            yield from self.written(self.blocks(plan.numel, cast), plan.name)
            return
        if len(plan.members) > 1 and not _mergeable(first.info.dtype) and DTYPES[first.info.dtype].numpy is not None:
            yield from self._compared(plan)
            return
        value = first.input.source.read_checked(first.name)
        if DTYPES[first.info.dtype].numpy is None:
            value = writer.RawTensor(first.info.dtype, tuple(first.info.shape), value)
        yield from writer.tensor_chunks(value)

    def _compared(self, plan: _TensorPlan) -> Iterator[np.ndarray]:
        """The first input's values, noting whether every other input holds the same."""
        readers = [_Reader(self, m) for m in plan.members]
        packed = DTYPES[plan.dtype].packed

        def compare(start: int, stop: int, extra: Any) -> _Block:
            n = stop - start
            held = self.recycler.take(readers[0].dtype, n)
            first = readers[0].block(start, stop, held[:n])
            raw = np.ascontiguousarray(first).view(np.uint8)
            for k, r in enumerate(readers[1:]):
                other = r.block(start, stop, self.scratch.get(("in", k), r.dtype, n))
                if not np.array_equal(raw, np.ascontiguousarray(other).view(np.uint8)):
                    self.differing.add(plan.name)
                    break
            return _Block([writer.pack_f4(first) if packed else np.ascontiguousarray(first)], 0, [held])

        yield from self.written(self.blocks(plan.numel, compare), plan.name)


def _encode(values: np.ndarray, dtype: str) -> tuple[list, int]:
    """`values` (1-D) in the written dtype, as pieces to write, and the count of overflowed values."""
    numpy = DTYPES[dtype].numpy
    if values.dtype == numpy:
        return [writer.pack_f4(values) if DTYPES[dtype].packed else values], 0
    try:
        casting.target_dtype(dtype)
    except errors.SafeckptError:  # F4, F8_E8M0, FNUZ: no overflow rule, ml_dtypes' rounding
        out = values.astype(numpy)
        return [writer.pack_f4(out) if DTYPES[dtype].packed else out], 0
    pieces, overflow = [], 0
    for block in casting.cast_blocks(values, dtype):
        pieces.append(block.values)
        overflow += block.overflow
    return pieces, overflow
