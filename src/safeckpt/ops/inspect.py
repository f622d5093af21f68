"""What a checkpoint holds, from its header or structure alone: the report `safeckpt inspect` shows.

A safetensors file is described from its validated header (two small reads);
every other format `open_source` reads from its structure, which nothing
executes. The report: totals, the tensors (repeated layers folded, see
`layout`), parameters per module and per dtype, metadata, the non-tensor tree
of a checkpoint (epoch, hyper-parameters), the scan verdict of pickle-based
files, and for a sharded model every shard at once. It is JSON-able; the CLI
only presents it. `describe_checkpoints` is the same for a CheckpointManager
directory: its committed and damaged checkpoints, read from their manifests.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ..sources.base import TensorSource

# Scan findings kept in a description (most severe first).
JSON_FINDINGS = 20
# Bytes of a shard read to tell a safetensors shard (read by its header alone) from others.
_SHARD_SNIFF_BYTES = 16
# Formats that hold no pickles (nothing to scan): safetensors' header is checked by reading it.
_NOT_SCANNED = ("safetensors", "raw", "sharded")
# A file named so is read as safetensors whatever its first bytes (as `verify` does), so that a
# damaged one gets the reader's precise reason; other unknown content gets `open_source`'s words.
SAFETENSORS_SUFFIX = ".safetensors"


def describe(path: "os.PathLike | str", template: Optional[str] = None, *,
             tensors: bool = True) -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-able dict; tensor data is never read.

    A safetensors file is described from its validated header alone; a sharded
    model (its folder or index JSON) from its index and its shards' headers; any
    other format `open_source` reads (PyTorch, Lightning, npz, ...) from its
    structure, which nothing executes, and pickle-based files are scanned.
    ``tensors=False`` leaves out the list of every tensor (the groups, modules
    and totals say the rest): half the memory for a header of a million tensors.

    >>> describe("model.safetensors")["totals"]["parameters"]
    1228800
    >>> describe("last.ckpt")["scan"]["verdict"]
    'safe'
    """
    from ..format.header import collector_paused

    with collector_paused():  # a report makes objects per tensor and no cycles (see collector_paused)
        report = _describe(os.fspath(path), template)
        if tensors:
            report["tensors"] = _tensor_list(report.pop("_infos"), "header_size" in report)
        else:
            del report["_infos"]
        return report


def _describe(path: str, template: Optional[str]) -> dict[str, Any]:
    from ..sources.detect import sniff
    from ..sources.sharded import find_index

    if template is None:
        if os.path.isdir(path):
            index = find_index(path)
            if index is not None:
                return _describe_sharded(path, index)
        else:
            kind = sniff(read_head(path))
            if kind == "safetensors" or (kind is None and path.endswith(SAFETENSORS_SUFFIX)):
                # A file that looks like safetensors, or is named so: the reader's errors say
                # precisely what is wrong with it (truncated, a gap, an LFS pointer, ...).
                return _describe_safetensors(path)
            if kind == "json":
                return _describe_sharded(path, path)
    # Anything else is opened as every command opens it, so unknown content gets the words
    # `convert` and the others give ("not a checkpoint format safeckpt reads: ...").
    return _describe_source(path, template)


def _tensor_list(infos: Any, with_offsets: bool) -> list[dict[str, Any]]:
    """One entry per tensor; a safetensors header's entries (`with_offsets`) add their data_offsets."""
    if with_offsets:
        return [{"name": name, "dtype": info.dtype, "shape": list(info.shape), "parameters": info.numel,
                 "bytes": info.nbytes, "data_offsets": list(info.data_offsets)} for name, info in infos.items()]
    return [{"name": name, "dtype": info.dtype, "shape": list(info.shape), "parameters": info.numel,
             "bytes": info.nbytes} for name, info in infos.items()]


def read_head(path: str) -> bytes:
    """The first bytes of a file, enough to tell its format (`sources.detect.sniff`)."""
    from ..format.storage import open_regular_file
    from ..sources.detect import SNIFF_BYTES

    with open_regular_file(path) as f:
        return f.read(SNIFF_BYTES)


def _describe_safetensors(path: str) -> dict[str, Any]:
    from ..format.reader import SafetensorsFile

    # pread: the header is read with two small reads; the data is never mapped or read.
    with SafetensorsFile(path, backend="pread") as file:
        header = file.header
    return _report(path, "safetensors", "safetensors file", header.data_start + header.data_size,
                   header.metadata, header.tensors, header_size=header.data_start)


def _describe_source(path: str, template: Optional[str]) -> dict[str, Any]:
    from ..sources import open_source

    with open_source(path, template=template) as source:
        if source.format != "safetensors":
            report = _source_report(path, source, sum(os.path.getsize(file) for file in source.files()))
            if source.format not in _NOT_SCANNED:
                report["scan"] = scan_summary(source.files())
            return report
        model_file = source.path
    return _describe_safetensors(model_file)  # a model folder's single file: its header is enough


def _describe_sharded(path: str, index: str) -> dict[str, Any]:
    from ..sources.sharded import ShardedSource, read_index

    with ShardedSource(index, _open_shard) as source:
        shards = source.shards
        report = _source_report(path, source, sum(os.path.getsize(s.path) for s in shards.values()))
        counts: dict[str, list[int]] = {name: [0, 0] for name in shards}
        for name, shard_name in read_index(index)["weight_map"].items():
            counts[shard_name][0] += 1
            counts[shard_name][1] += source.infos[name].nbytes
        report["shards"] = [{"file": name, "format": shard.format, "tensors": counts[name][0],
                             "bytes": counts[name][1], "file_size": os.path.getsize(shard.path)}
                            for name, shard in sorted(shards.items())]
        total_size = source.index_metadata.get("total_size")
        tensor_bytes = source.total_bytes
        report["index"] = {"file": index, "total_size": total_size, "tensor_bytes": tensor_bytes,
                           "matches": None if not isinstance(total_size, int) else total_size == tensor_bytes}
        report["unknown_globals"] = _unknown_globals(shards.values())
        pickled = [s.path for s in shards.values() if s.format not in _NOT_SCANNED]
        if pickled:
            report["scan"] = scan_summary(pickled)
    return report


def _open_shard(path: str) -> TensorSource:
    from ..format.storage import open_regular_file
    from ..sources import open_source
    from ..sources.detect import sniff
    from ..sources.safetensors_source import SafetensorsSource

    with open_regular_file(path) as f:
        head = f.read(_SHARD_SNIFF_BYTES)
    if sniff(head) == "safetensors":
        return SafetensorsSource(path, backend="pread")
    return open_source(path)


def _source_report(path: str, source: TensorSource, size: int) -> dict[str, Any]:
    from .selection import choose_tensors

    # Lightning / SD checkpoints keep the weights under "state_dict": modules are counted inside it.
    prefix = choose_tensors(source, extract="auto").extracted
    report = _report(path, source.format, source.describe(), size, source.metadata, source.infos,
                     prefix=prefix, aliases=source.aliases)
    report["structure"] = without_tensors(source.tree)
    report["aliases"] = dict(source.aliases)
    report["notes"] = list(source.notes)
    report["unknown_globals"] = _unknown_globals([source])
    return report


def _unknown_globals(sources: Any) -> list[str]:
    return sorted({f"{g.module}.{g.name}" for source in sources for g in getattr(source, "globals", ())
                   if not g.allowed})


def without_tensors(tree: Any) -> Any:
    """The structure with tensor references and containers of only tensors left out."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return None
        kept = {k: without_tensors(v) for k, v in tree.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    if isinstance(tree, list):
        kept_list = [without_tensors(v) for v in tree]
        return None if all(v is None for v in kept_list) and tree else kept_list
    return tree


def scan_summary(paths: list[str]) -> dict[str, Any]:
    """The worst scan verdict over `paths` and the most severe findings (what --json shows).

    >>> scan_summary(["model.ckpt"])
    {'verdict': 'safe', 'files': 1, 'findings': [], 'findings_total': 0, 'error': None}
    """
    from dataclasses import asdict

    from .scan import SEVERITIES, VERDICT_RANK, scan

    reports = [scan(p) for p in paths]
    verdict = max((r.verdict for r in reports), key=VERDICT_RANK.__getitem__)
    findings = [dict(asdict(f), file=r.path) for r in reports for f in r.findings]
    findings.sort(key=lambda f: -SEVERITIES.get(f["severity"], 0))  # stable: file order within a severity
    errors = [f"{r.path}: {r.error}" for r in reports if r.error is not None]
    return {"verdict": verdict, "files": len(paths), "findings": findings[:JSON_FINDINGS],
            "findings_total": len(findings), "error": "; ".join(errors) or None}


def _share(part: int, total: int) -> float:
    return part / total if total else 0.0


def _report(path: str, format: str, description: str, file_size: int, metadata: Any, infos: Any,
            header_size: Any = None, prefix: Optional[str] = None,
            aliases: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The report without its list of tensors; `infos` is kept under "_infos" for `describe`."""
    from ..format.dtypes import DTYPES
    from .layout import group_tensors, module_totals

    groups = group_tensors(infos)
    by_dtype: dict[str, dict[str, int]] = {}
    for group in groups:  # every tensor is in one group: totals per dtype add up the groups
        totals = by_dtype.setdefault(group.dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        totals["tensors"] += group.count
        totals["parameters"] += group.parameters
        totals["bytes"] += group.bytes
    for name in aliases or ():  # a tied tensor's values are counted once, under the name it is tied to
        info = infos[name]
        totals = by_dtype[info.dtype]
        totals["tensors"] -= 1
        totals["parameters"] -= info.numel
        totals["bytes"] -= info.nbytes
    by_dtype = {dtype: totals for dtype, totals in by_dtype.items() if totals["tensors"]}
    parameters = sum(t["parameters"] for t in by_dtype.values())
    # In the order the format writes dtypes: widest first.
    dtype_order = sorted(by_dtype, key=lambda n: -DTYPES[n].rank)
    report = {
        "file": path,
        "format": format,
        "description": description,
        "file_size": file_size,
        "_infos": infos,
        "totals_by_dtype": {name: by_dtype[name] for name in dtype_order},
        "share_by_dtype": {name: _share(by_dtype[name]["parameters"], parameters) for name in dtype_order},
        "totals": {"tensors": len(infos), "tied": len(aliases or ()), "parameters": parameters,
                   "bytes": sum(t["bytes"] for t in by_dtype.values())},
        "metadata": metadata,
        "groups": [{"pattern": g.pattern, "count": g.count, "dtype": g.dtype, "shape": list(g.shape),
                    "parameters": g.parameters, "bytes": g.bytes, "indices": [list(i) for i in g.indices]}
                   for g in groups],
        "modules_prefix": prefix,
        "modules": [_module(m, parameters) for m in module_totals(infos, prefix=prefix)],
    }
    if header_size is not None:
        # with the 8-byte length prefix: header_size + bytes = file_size
        report["header_size"] = header_size
    return report


def _module(module: Any, total: int) -> dict[str, Any]:
    entry = {"name": module.name, "tensors": module.tensors, "parameters": module.parameters,
             "bytes": module.bytes, "share": _share(module.parameters, total)}
    if module.children:
        entry["children"] = [_module(child, total) for child in module.children]
    return entry


# --- a CheckpointManager directory ------------------------------------------------------

def describe_checkpoints(directory: str, monitor: Optional[str] = None, mode: Optional[str] = None
                         ) -> dict[str, Any]:
    """Everything `ls` shows of a CheckpointManager directory (a local path or an fsspec URL),
    as a JSON-able dict: its committed checkpoints, oldest step first, and its damaged ones.

    Only manifests are read (nothing is hashed), and nothing is locked, created or
    changed. The best checkpoint is the one `format.checkpoint_dir.best` picks (the ranking
    the manager's retention uses), by default by the `monitor` and `mode` the newest
    checkpoint's manager recorded (none: no best is marked). Metrics that are NaN or
    infinite are the strings "NaN", "Infinity" and "-Infinity": standard JSON.

    >>> describe_checkpoints("checkpoints")["latest"]
    1200
    """
    from ..format.checkpoint_dir import best, inspect_directory

    listing = inspect_directory(directory)
    monitor = monitor or listing.monitor
    mode = mode or listing.mode
    found = best(listing.checkpoints, monitor, mode) if monitor else None
    latest = listing.checkpoints[-1] if listing.checkpoints else None
    return {
        "directory": directory,
        "monitor": monitor, "mode": mode if monitor else None,
        "latest": latest.step if latest else None,
        "best": found.step if found else None,
        "checkpoints": [{"step": info.step, "time": info.time, "size": info.size, "path": info.path,
                         "metrics": {key: _json_number(value) for key, value in info.metrics.items()},
                         "latest": info is latest, "best": info is found}
                        for info in listing.checkpoints],
        "damaged": [{"step": bad.step, "path": bad.path, "error": str(bad.error)} for bad in listing.damaged],
    }


def _json_number(value: Any) -> Any:
    """NaN and infinities as strings, so that the report is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value
