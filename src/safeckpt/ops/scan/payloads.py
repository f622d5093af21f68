"""Payloads a pickle hands to a nested loader (pickle.loads, torch.load, marshal, ...).

A pickle can carry a second pickle (or a torch or numpy file) as bytes and have a
loader of the loading process deserialize it: `loader_calls` finds such calls in
the value the pickle built (with the bytes they pass), `sweep` finds every string
or bytes argument in the opcodes (a result that was popped leaves no trace in the
value); the scan reads what it finds as a file of its own.
"""

from __future__ import annotations

import pickletools
from typing import Any, Iterator, Optional

from ...sources.pickle_vm import Placeholder, PlaceholderCall
from .rules import NESTED_LOADERS

__all__ = ["loader_calls", "sweep", "as_payload"]

# Objects visited when walking a pickle's value for nested loader calls (a pickle
# can describe a DAG whose tree is exponential: the walk de-duplicates by identity too).
MAX_WALK_NODES = 1_000_000
# Opcodes disassembled when sweeping a pickle for embedded payloads.
MAX_SWEEP_OPCODES = 2_000_000


def as_payload(x: Any) -> Optional[bytes]:
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if isinstance(x, str):  # Python 2 strings, protocol 0 STRING arguments
        try:
            return x.encode("latin-1")
        except UnicodeEncodeError:
            return None
    return None


def loader_calls(value: Any) -> list[tuple[str, int, bytes]]:
    """(loader, offset, payload) of every nested-loader call reachable from `value`."""
    out = []
    stack, seen, visited = [value], set(), 0
    while stack and visited < MAX_WALK_NODES:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        visited += 1
        if isinstance(x, PlaceholderCall):
            qual = x.func.qualname if isinstance(x.func, Placeholder) else None
            if qual in NESTED_LOADERS:
                for payload in _payloads(list(x.args) + list(x.kwargs.values())):
                    out.append((qual, x.offset, payload))
            stack.extend([x.func, *x.args, *x.kwargs.values(), *x.state, *x.items])
            stack.extend(v for pair in x.setitems for v in pair)
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
    return out


def _payloads(args: list, depth: int = 0) -> Iterator[bytes]:
    """Bytes among call arguments, through wrappers such as io.BytesIO(b"...")."""
    for a in args:
        payload = as_payload(a)
        if payload is not None:
            yield payload
        elif depth < 3 and isinstance(a, PlaceholderCall):
            yield from _payloads(list(a.args) + list(a.kwargs.values()), depth + 1)
        elif depth < 3 and isinstance(a, (list, tuple)):
            yield from _payloads(list(a)[:64], depth + 1)


def sweep(view: memoryview, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of every string or bytes argument in the opcodes of `view[start:end]`."""
    ops = pickletools.genops(bytes(view[start:end]))
    for count in range(MAX_SWEEP_OPCODES):
        try:
            op, arg, pos = next(ops)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - a malformed stream ends the sweep where it breaks
            return
        payload = as_payload(arg) if isinstance(arg, (bytes, bytearray, str)) else None
        if payload is not None and len(payload) >= 2:
            yield start + pos, payload
