"""Which tensors of a source a conversion writes, under which names, and which are tied.

`choose_tensors` applies, in order: `extract` (a Lightning / Stable Diffusion
``state_dict`` sub-tree, its prefix removed), the SD EMA handling (``ema="drop"``
or ``"only"``), then the `select` / `exclude` name globs. `tied_names` groups
names that hold the same values (the source's aliases, or arrays that are the same
bytes of the same mapped storage) so that each is written once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .. import errors
from ..sources.base import TensorSource

__all__ = ["Choice", "choose_tensors", "tied_names", "first_items", "matches", "name_globs"]

EMA_PREFIX = "model_ema."
MODEL_PREFIX = "model."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")

# --extract auto: which checkpoints hold their weights under a top-level key, told
# apart by their other top-level keys (the first row that matches names the kind).
_WRAPPED_CHECKPOINTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("a Lightning checkpoint", "state_dict", ("pytorch-lightning_version", "epoch", "global_step")),
    ("a Stable Diffusion checkpoint", "state_dict", ()),
)


# --- choosing tensors ------------------------------------------------------------------

@dataclass
class Choice:
    """Output name -> source name, in write order, and what was left out and why."""

    names: dict[str, str]
    skipped: list[str]
    extracted: Optional[str]
    notes: list[str]


def choose_tensors(source: TensorSource, *, extract: Optional[str] = "auto", ema: Optional[str] = None,
                   select: Sequence[str] = (), exclude: Sequence[str] = ()) -> Choice:
    """Decide which tensors are written, under which names (see `convert`).

    >>> choose_tensors(src, extract="state_dict").names
    {'layer.weight': 'state_dict.layer.weight', ...}
    """
    notes: list[str] = []
    prefix = _extract_key(source, extract, notes)
    if prefix is None:
        names = {name: name for name in source.infos}
    else:
        cut = len(prefix) + 1
        names = {name[cut:]: name for name in source.infos if name.startswith(prefix + ".")}
    if ema is not None:
        names = _apply_ema(source, names, ema, notes)
    if select:
        names = {out: name for out, name in names.items() if matches(out, select)}
    if exclude:
        names = {out: name for out, name in names.items() if matches(out, (), exclude)}
    if not names and (select or exclude or prefix is not None) and len(source.infos):
        raise errors.SafeckptError(
            f"nothing to convert: no tensor is left after {_describe_filters(prefix, select, exclude)} "
            f"(the source has {len(source.infos)} tensors, e.g. {first_items(source.infos)})", path=source.path)
    used = set(names.values())
    skipped = [name for name in source.infos if name not in used]
    return Choice(names, skipped, prefix, notes)


def name_globs(value: "Sequence[str] | str | None", what: str) -> tuple[str, ...]:
    """`select` / `exclude` as given by a caller (None, one glob, or a list) as a tuple of globs.

    >>> name_globs("model.*", "select"), name_globs(None, "exclude")
    (('model.*',), ())
    """
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    globs = tuple(value)
    if not all(isinstance(g, str) for g in globs):
        raise errors.SafeckptError(f"{what} must be a list of name globs (strings), got {value!r}")
    return globs


def matches(name: str, select: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """True if `name` matches one of the `select` globs (or there are none) and none of `exclude`.

    >>> matches("model.norm.weight", ["*.weight"], ["*norm*"])
    False
    """
    if select and not any(fnmatch.fnmatchcase(name, g) for g in select):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in exclude)


def _extract_key(source: TensorSource, extract: Optional[str], notes: list[str]) -> Optional[str]:
    if extract is None or str(extract).lower() == "none":
        return None
    top = source.tree if isinstance(source.tree, dict) else {}
    if extract == "auto":
        for kind, key, marks in _WRAPPED_CHECKPOINTS:
            if key in top and (not marks or any(m in top for m in marks)) and _has_prefix(source, key):
                notes.append(f"extracted the tensors under {key!r} ({kind}); use extract=None to keep all")
                return key
        return None
    key = str(extract).strip(".")
    if not _has_prefix(source, key):
        keys = ", ".join(repr(k) for k in list(top)[:20]) or "none"
        raise errors.SafeckptError(
            f"cannot extract {key!r}: no tensors under it (top-level keys: {keys}); pass another key, "
            "or extract=None for every tensor", path=source.path)
    return key


def _has_prefix(source: TensorSource, key: str) -> bool:
    return any(name.startswith(key + ".") for name in source.infos)


def _apply_ema(source: TensorSource, names: dict[str, str], ema: str, notes: list[str]) -> dict[str, str]:
    """Stable Diffusion's LitEma keeps "model.a.b.c" as "model_ema.abc" (dots removed)."""
    ema_names = [out for out in names if out.startswith(EMA_PREFIX)]
    kept = {out: name for out, name in names.items() if not out.startswith(EMA_PREFIX)}
    if ema == "drop":
        if ema_names:
            notes.append(f"dropped {len(ema_names)} EMA tensors ({EMA_PREFIX}*)")
        return kept
    weights = [out for out in ema_names if out not in EMA_BOOKKEEPING]
    if not weights:
        raise errors.SafeckptError(
            f"ema='only' but the checkpoint has no EMA weights ({EMA_PREFIX}* tensors); convert without it",
            path=source.path)
    replaced = 0
    for out in kept:
        if not out.startswith(MODEL_PREFIX):
            continue
        twin = EMA_PREFIX + out[len(MODEL_PREFIX):].replace(".", "")
        if twin not in names:
            continue
        mine, theirs = source.infos[kept[out]], source.infos[names[twin]]
        if tuple(mine.shape) != tuple(theirs.shape):
            raise errors.SafeckptError(
                f"the EMA copy {twin!r} has shape {list(theirs.shape)} but the weight has {list(mine.shape)}",
                path=source.path, tensor=out)
        kept[out] = names[twin]
        replaced += 1
    if not replaced:
        raise errors.SafeckptError(
            f"ema='only': none of the {len(weights)} {EMA_PREFIX}* tensors matches a {MODEL_PREFIX}* weight "
            f"(e.g. {weights[0]!r}); this is not a Stable Diffusion EMA layout", path=source.path)
    notes.append(f"replaced {replaced} weights by their EMA copies and dropped {len(ema_names)} "
                 f"{EMA_PREFIX}* tensors")
    return kept


def _describe_filters(prefix: Optional[str], select: Sequence[str], exclude: Sequence[str]) -> str:
    parts = ([f"extracting {prefix!r}"] if prefix else []) + ([f"select {list(select)}"] if select else []) \
        + ([f"exclude {list(exclude)}"] if exclude else [])
    return ", ".join(parts) or "filtering"


# --- tied tensors ------------------------------------------------------------------

def tied_names(source: TensorSource, choice: Choice) -> dict[str, str]:
    """Dropped output name -> kept output name, for tensors holding the same values.

    The kept name of a group is the smallest, as save_model keeps it.
    """
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            parent[name] = parent.get(parent[name], parent[name])
            name = parent[name]
        return name

    def join(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    wanted = set(choice.names.values())
    for name, same in source.aliases.items():
        if name in wanted and same in wanted:
            join(name, same)
    for a, b in _same_memory(source, [n for n in source.infos if n in wanted]):
        join(a, b)
    groups: dict[str, list[str]] = {}
    for out, name in choice.names.items():
        groups.setdefault(root(name), []).append(out)
    aliases: dict[str, str] = {}
    for outs in groups.values():
        keep = min(outs)
        aliases.update({out: keep for out in outs if out != keep})
    return aliases


def _same_memory(source: TensorSource, names: list[str]) -> Iterator[tuple[str, str]]:
    """Pairs of names whose arrays are the same bytes of the same memory (same view).

    Only for sources that map their file: reading a view costs nothing. The first
    array that lives in a private copy ends the search, as it means the source copies
    (and reports its own aliases); arrays are kept alive so addresses cannot be reused.
    """
    if source.format == "safetensors":  # the format cannot share bytes between tensors
        return
    seen: dict[tuple, str] = {}
    alive: list[np.ndarray] = []
    for name in names:
        array = source.read(name)
        if array.size == 0 or not isinstance(array, np.ndarray):
            continue
        if _in_private_copy(array):
            return
        alive.append(array)
        key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
        first = seen.setdefault(key, name)
        if first != name:
            yield first, name


def _in_private_copy(array: np.ndarray) -> bool:
    base: Any = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, (np.ndarray, bytes, bytearray))


def first_items(items: Iterable, count: int = 3) -> str:
    """The first few items, quoted, and how many more there are (for messages)."""
    listed = list(items)
    shown = ", ".join(repr(x) for x in listed[:count])
    return shown + (f" and {len(listed) - count} more" if len(listed) > count else "")

