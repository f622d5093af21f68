"""From per-case measurements to the comparison table (floors, pass/fail) and BENCHMARKS.md."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional

from .cases import ROW_BYTES, SLICE_ROW, SLICE_SHAPE
from .statedict import MiB, human_bytes

Results = Dict[str, List[dict]]  # case name -> one measurement per repetition

# How many times the row's own bytes a one-row slice may touch and still be O(row):
# room for the kernel's fault-around (16 pages) on the mmap backend.
SLICE_SLACK = 16


@dataclass(frozen=True)
class Comparison:
    """One row: ours against a peer (or a reference) on one quantity, with an optional floor.

    kind:
      "time"      ratio = ours / peer seconds; passes if ratio <= floor
      "speedup"   ratio = ours / peer seconds; passes if ratio <= floor (floor = 1 / required speedup)
      "bandwidth" ratio = our bandwidth / peer bandwidth; passes if ratio >= floor
      "memory"    ours = extra peak RSS; passes if ours <= floor bytes (peer shown for reference); a floor
                  of None is read from the ours case's "memory_floor" (it depends on the model)
      "throughput" ours = bytes / seconds; passes if ours >= floor GB/s (peer shown for reference)
      "memory_ratio" ratio = ours / peer extra peak RSS; passes if ratio <= floor
      "seconds"   ours = seconds; passes if ours <= floor seconds (peer shown for reference)
      "bytes"     ours = bytes touched; passes if ours <= floor bytes; ratio = ours / peer bytes
    """

    label: str
    ours: str
    peer: str
    peer_label: str
    kind: str = "time"
    floor: Optional[float] = None
    floor_text: str = "—"


COMPARISONS = [
    Comparison("save_file, torch dict", "save.torch.ours", "save.torch.safetensors", "safetensors",
               floor=1.0, floor_text="≤ 1.00×"),
    Comparison("save_file, torch dict", "save.torch.ours", "save.torch.torch_save", "torch.save"),
    Comparison("save_file, torch dict: extra peak RSS", "save.torch.ours", "save.torch.safetensors",
               "safetensors", kind="memory", floor=64 * MiB, floor_text="≤ 64 MiB"),
    Comparison("save_file, numpy dict", "save.numpy.ours", "save.numpy.safetensors", "safetensors",
               floor=1.0, floor_text="≤ 1.00×"),
    Comparison("save_file, numpy dict", "save.numpy.ours", "save.numpy.savez", "numpy.savez"),
    Comparison("save_file, numpy dict: extra peak RSS", "save.numpy.ours", "save.numpy.safetensors",
               "safetensors", kind="memory", floor=64 * MiB, floor_text="≤ 64 MiB"),
    Comparison("load_file torch, lazy", "load.lazy.ours", "load.lazy.safetensors", "safetensors",
               floor=1.0, floor_text="≤ 1.00×"),
    Comparison("load_file torch, lazy", "load.lazy.ours", "load.lazy.torch_mmap", "torch.load(mmap=True)"),
    Comparison("load_file torch + read every page", "load.full.ours", "load.full.safetensors", "safetensors",
               floor=1.05, floor_text="≤ 1.05×"),
    Comparison("load_file torch + read every page", "load.full.ours", "load.full.torch_mmap",
               "torch.load(mmap=True)"),
    Comparison("load_file torch + read every page", "load.full.ours", "load.full.torch_nommap",
               "torch.load(mmap=False)"),
    Comparison("safe_load (a safe torch.load), lazy", "safe_load.lazy.ours", "load.lazy.torch_mmap",
               "torch.load(mmap=True)", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("safe_load + read every page", "safe_load.full.ours", "load.full.torch_nommap",
               "torch.load(weights_only=True)", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("safe_load + read every page", "safe_load.full.ours", "load.full.torch_mmap",
               "torch.load(mmap=True)", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("safe_load(mmap=False) + read every page", "safe_load.full.ours_nommap", "load.full.torch_nommap",
               "torch.load(weights_only=True)", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("distributed checkpoint save, 2 gloo ranks (Shard(0) DTensors), fsynced", "dcp.save.ours",
               "dcp.save.dcp", "dcp.save + FileSystemWriter", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("distributed checkpoint load saved by 2 ranks into 1 process (hashes checked)", "dcp.load.ours",
               "dcp.load.dcp", "dcp.load + FileSystemReader", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("numpy load_file", "load.numpy.ours", "load.numpy.safetensors", "safetensors.numpy",
               kind="speedup", floor=0.2, floor_text="≤ 0.20× (≥ 5× faster)"),
    Comparison("distributed checkpoint save, 2 gloo ranks (Shard(0) DTensors), fsynced", "dcp.save.ours",
               "dcp.save.dcp", "dcp.save + FileSystemWriter", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("distributed checkpoint load saved by 2 ranks into 1 process (hashes checked)", "dcp.load.ours",
               "dcp.load.dcp", "dcp.load + FileSystemReader", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("numpy load_file", "load.numpy.ours", "load.numpy.npz", "numpy.load(.npz)"),
    Comparison("load_file(copy=True) bandwidth", "copy.ours", "copy.memcpy", "memcpy",
               kind="bandwidth", floor=0.8, floor_text="≥ 0.80× memcpy"),
    Comparison("get_slice one row, pread: bytes read", "slice.pread_row.ours", "slice.pread_whole.ours",
               "whole tensor", kind="bytes", floor=SLICE_SLACK * ROW_BYTES,
               floor_text=f"≤ {SLICE_SLACK}× row ({human_bytes(SLICE_SLACK * ROW_BYTES)})"),
    Comparison("get_slice one row, mmap: pages resident", "slice.mmap_row.ours", "slice.mmap_whole.ours",
               "whole tensor", kind="bytes", floor=SLICE_SLACK * ROW_BYTES,
               floor_text=f"≤ {SLICE_SLACK}× row ({human_bytes(SLICE_SLACK * ROW_BYTES)})"),
    Comparison("get_slice one row, mmap: pages resident", "slice.mmap_row.ours", "slice.mmap_row.safetensors",
               "safetensors", kind="bytes"),
    Comparison("open a torch .pt and list its tensors", "list.ours", "list.torch",
               "torch.load(weights_only=True)", kind="speedup", floor=0.1,
               floor_text="≤ 0.10× (≥ 10× faster)"),
    Comparison("scan a torch .pt", "scan.ours", "list.torch", "torch.load (reference)", kind="seconds",
               floor=0.1, floor_text="≤ 0.1 s"),
    Comparison("safe_open + keys(), a header of 1M tensors (fewer below --size 1GiB)", "header.keys.ours",
               "header.keys.safetensors", "safetensors (Rust)"),
    Comparison("safe_open + keys(), 1M tensors: extra peak RSS", "header.keys.ours", "header.keys.safetensors",
               "safetensors (Rust)", kind="memory", floor=768 * MiB, floor_text="≤ 768 MiB"),
    Comparison("inspect, a header of 1M tensors", "header.inspect.ours", "header.keys.safetensors",
               "safetensors keys() (reference)", kind="seconds", floor=20, floor_text="≤ 20 s"),
    Comparison("inspect, 1M tensors: extra peak RSS", "header.inspect.ours", "header.keys.safetensors",
               "safetensors keys() (reference)", kind="memory", floor=1024 * MiB, floor_text="≤ 1 GiB"),
    Comparison("inspect --json, a header of 1M tensors", "header.inspect_json.ours", "header.keys.safetensors",
               "safetensors keys() (reference)", kind="seconds", floor=30, floor_text="≤ 30 s"),
    Comparison("inspect --json, 1M tensors: extra peak RSS", "header.inspect_json.ours",
               "header.keys.safetensors", "safetensors keys() (reference)", kind="memory",
               floor=1536 * MiB, floor_text="≤ 1.5 GiB"),
    Comparison("`safeckpt --version`, a fresh process", "startup.version.ours", "startup.python.interpreter",
               "python -c pass (reference)", kind="seconds", floor=0.3, floor_text="≤ 0.3 s"),
    Comparison("`safeckpt --help`, a fresh process", "startup.help.ours", "startup.python.interpreter",
               "python -c pass (reference)", kind="seconds", floor=0.3, floor_text="≤ 0.3 s"),
    Comparison("`safeckpt inspect` of a small file, a fresh process", "startup.inspect.ours",
               "startup.inspect.safetensors", "python + safetensors safe_open().keys()", kind="seconds",
               floor=0.5, floor_text="≤ 0.5 s"),
    Comparison("convert torch .pt -> safetensors (with source sha256, the default)", "convert.ours",
               "convert.torch_safetensors", "torch.load + safetensors save_file", floor=0.6,
               floor_text="≤ 0.60×"),
    Comparison("convert torch .pt -> safetensors (--no-source-hash)", "convert.ours_nohash",
               "convert.torch_safetensors", "torch.load + safetensors save_file", floor=0.6,
               floor_text="≤ 0.60×"),
    Comparison("checkpoint save (sync, fsynced)", "ckpt.save.ours", "ckpt.save.plain_write",
               "plain sequential write + fsync", floor=1.25, floor_text="≤ 1.25× (≥ 0.8× its throughput)"),
    Comparison("checkpoint save (sync, fsynced)", "ckpt.save.ours", "ckpt.save.torch_save",
               "torch.save + fsync", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("checkpoint save (async): caller blocked", "ckpt.async.ours", "copy.memcpy",
               "in-memory copy of the state", floor=1.5, floor_text="≤ 1.50×"),
    Comparison("checkpoint restore", "ckpt.restore.ours", "ckpt.restore.torch_load",
               "torch.load(weights_only=True)", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("checkpoint restore with hash verification", "ckpt.restore_verify.ours",
               "ckpt.restore.ours", "restore without verification", floor=1.5,
               floor_text="≤ 1.50× (hashing adds ≤ 50%)"),
    Comparison("Lightning checkpoint save (Trainer's dict, 1/4 of --size + AdamW), fsynced", "lightning.save.ours",
               "lightning.save.torch_io", "TorchCheckpointIO + fsync", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("Lightning checkpoint load (ours hash-checked) + read every page", "lightning.load.ours",
               "lightning.load.torch_io", "TorchCheckpointIO (torch.load)", floor=1.0, floor_text="≤ 1.00×"),
    Comparison("convert torch .pt -> safetensors: extra peak RSS", "convert.ours",
               "convert.torch_safetensors", "torch.load + safetensors save_file", kind="memory_ratio",
               floor=0.3, floor_text="≤ 0.30× theirs"),
    Comparison("diff of two checkpoints (float64 stats)", "diff.ours", "diff.read",
               "reading both files", kind="bandwidth", floor=0.5, floor_text="≥ 0.50× read bandwidth"),
    Comparison("merge --method linear of three checkpoints", "merge.ours", "merge.io",
               "reading 3 + writing 1", kind="bandwidth", floor=0.7, floor_text="≥ 0.70× that bandwidth"),
    Comparison("merge --method linear: extra peak RSS", "merge.ours", "merge.io", "reading 3 + writing 1",
               kind="memory", floor=None, floor_text="≤ 256 MiB + 4 × largest tensor"),
    Comparison("verify (blake3 manifest check): hashing", "verify.ours", "verify.sha256",
               "hashlib sha256 (reference)", kind="throughput", floor=1.5, floor_text="≥ 1.5 GB/s"),
]


def median(results: Results, case: str, key: str) -> Optional[float]:
    values = [r[key] for r in results.get(case, []) if r.get(key) is not None]
    return statistics.median(values) if values else None


def best(results: Results, case: str) -> Optional[float]:
    values = [r["seconds"] for r in results.get(case, [])]
    return min(values) if values else None


def _rate(results: Results, case: str) -> Optional[float]:
    """Bytes per second, from the median time."""
    seconds, nbytes = median(results, case, "seconds"), median(results, case, "bytes")
    return nbytes / seconds if seconds and nbytes else None


def _seconds(value: Optional[float]) -> str:
    return "error" if value is None else f"{value:.3f} s"


@dataclass
class Row:
    label: str
    peer_label: str
    ours: str
    peer: str
    ratio: str
    best_ratio: str  # the same ratio from each side's fastest repetition: less sensitive to a noisy machine
    floor: str
    verdict: str  # "pass", "FAIL", "" (no floor), "error"
    bests_pass: bool = False  # a FAIL whose ratio of bests meets the floor: within run-to-run noise


def evaluate(comparison: Comparison, results: Results) -> Row:
    c = comparison
    verdict, ratio_text, best_text, bests_pass = "", "—", "—", False
    if c.kind in ("memory", "memory_ratio"):
        ours, peer = median(results, c.ours, "peak_extra"), median(results, c.peer, "peak_extra")
        ours_text = "error" if ours is None else human_bytes(ours)
        peer_text = "error" if peer is None else human_bytes(peer)
        floor = c.floor if c.floor is not None else median(results, c.ours, "memory_floor")
        if c.kind == "memory" and ours is not None and floor is not None:
            verdict = "pass" if ours <= floor else "FAIL"
        elif ours is not None and peer:
            ratio_text = f"{ours / peer:.2f}×"
            verdict = "pass" if ours / peer <= c.floor else "FAIL"
    elif c.kind == "throughput":
        ours_rate, peer_rate = (_rate(results, case) for case in (c.ours, c.peer))
        ours = ours_rate
        peer = peer_rate
        ours_text = "error" if ours_rate is None else f"{ours_rate / 1e9:.2f} GB/s"
        peer_text = "error" if peer_rate is None else f"{peer_rate / 1e9:.2f} GB/s"
        if ours_rate is not None:
            verdict = "pass" if ours_rate / 1e9 >= c.floor else "FAIL"
    elif c.kind == "seconds":
        ours, peer = median(results, c.ours, "seconds"), median(results, c.peer, "seconds")
        ours_text, peer_text = _seconds(ours), _seconds(peer)
        if ours is not None:
            verdict = "pass" if ours <= c.floor else "FAIL"
    elif c.kind == "bytes":
        ours, peer = median(results, c.ours, "bytes"), median(results, c.peer, "bytes")
        ours_text = "error" if ours is None else human_bytes(ours)
        peer_text = "error" if peer is None else human_bytes(peer)
        if ours is not None and peer:
            ratio_text = f"{ours / peer:.5f}×"
        if ours is not None and c.floor is not None:
            verdict = "pass" if ours <= c.floor else "FAIL"
    else:
        ours, peer = median(results, c.ours, "seconds"), median(results, c.peer, "seconds")
        ours_text, peer_text = _seconds(ours), _seconds(peer)
        if ours is not None and peer is not None and ours > 0:
            if c.kind == "bandwidth":
                nbytes = median(results, c.ours, "bytes")
                ratio = peer / ours
                best_ratio = best(results, c.peer) / best(results, c.ours)
                best_text = f"{best_ratio:.2f}×"
                bests_pass = c.floor is not None and best_ratio >= c.floor
                ours_text += f" ({nbytes / ours / 1e9:.1f} GB/s)"
                peer_text += f" ({nbytes / peer / 1e9:.1f} GB/s)"
                ratio_text = f"{ratio:.2f}×"
                if c.floor is not None:
                    verdict = "pass" if ratio >= c.floor else "FAIL"
            else:
                ratio = ours / peer
                ratio_text = f"{ratio:.2f}×"
                best_ratio = best(results, c.ours) / best(results, c.peer)
                best_text = f"{best_ratio:.2f}×"
                bests_pass = c.floor is not None and best_ratio <= c.floor
                if c.floor is not None:
                    verdict = "pass" if ratio <= c.floor else "FAIL"
    needs_peer = c.floor is not None and c.kind in ("time", "speedup", "bandwidth", "memory_ratio")
    if ours is None or (needs_peer and peer is None):
        verdict = "error"
    return Row(c.label, c.peer_label, ours_text, peer_text, ratio_text, best_text, c.floor_text, verdict,
               verdict == "FAIL" and bests_pass)


def rows(results: Results) -> List[Row]:
    return [evaluate(c, results) for c in COMPARISONS]


# What bounds a row that misses its floor even in its fastest repetitions (measured, not guessed).
KNOWN_GAPS = {
    "checkpoint restore with hash verification":
        "verification is a second pass: the tensors are read at memory speed, then hashed with BLAKE3 at "
        "about 3 GB/s on this machine's two cores (the `verify` row), so hashing 1 GiB adds about 0.2-0.3 s "
        "to a 0.3 s restore; checking each tensor as it is first read is the work of issue 19",
    "save_file, numpy dict":
        "a gap of about 5% in medians and bests alike, not yet explained: the torch row writes the same "
        "bytes through the same writer, fsyncs included, and meets its floor (it was 1.00x in the previous "
        "committed run)",
    "safe_load (a safe torch.load), lazy":
        "a fixed cost of about 25-30 ms for the 315 tensors against torch.load's C++ unpickler: the scan "
        "before loading (zip checks, CRCs of the small members, one pass of the Python pickle machine over "
        "data.pkl, about 20 ms) and building the torch views (about 10 ms); the reader reuses the scan's "
        "reading of data.pkl (one pickle pass, not two), and the pickle machine's speed is issue 19's work. "
        "Once pages are read the gap is gone (the rows below)",
    "merge --method linear of three checkpoints":
        "0.74x in the previous committed run with the same merge code: this run's reading-and-writing "
        "reference ran faster while the merge did not; within this machine's run-to-run spread",
}


def floor_notes(table: List[Row]) -> List[str]:
    """A line for each floor the medians miss: within noise (the fastest repetitions meet it), or what
    bounds it; a miss is never left without a line."""
    notes = []
    for r in table:
        if r.verdict != "FAIL":
            continue
        if r.bests_pass:
            notes.append(f"{r.label} vs {r.peer_label}: the medians miss the floor ({r.ratio}) but the fastest "
                         f"repetitions meet it ({r.best_ratio}), so the gap is within this machine's run-to-run "
                         "noise; a larger --repeat settles it")
        else:
            notes.append(f"{r.label} vs {r.peer_label} ({r.ratio}): "
                         + KNOWN_GAPS.get(r.label, "misses its floor; nothing recorded yet explains it"))
    return notes


def comparison_table(table: List[Row]) -> str:
    lines = ["| operation | vs | ours | theirs | ratio | ratio of bests | floor | result |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in table:
        verdict = {"pass": "pass", "FAIL": "**FAIL**", "error": "**error**", "": "(reference)"}[r.verdict]
        lines.append(f"| {r.label} | {r.peer_label} | {r.ours} | {r.peer} | {r.ratio} | {r.best_ratio} "
                     f"| {r.floor} | {verdict} |")
    return "\n".join(lines)


def details_table(results: Results, order: List[str]) -> str:
    lines = ["| case | median | min | max | CPU time | minor faults | RSS before | extra peak RSS "
             "(median / max) | other |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case in order:
        runs = results.get(case, [])
        if not runs:
            lines.append(f"| {case} | error | | | | | | | |")
            continue
        seconds = [r["seconds"] for r in runs]
        extra = [r["peak_extra"] for r in runs]
        other = []
        for key in ("bytes", "result_bytes", "minor_faults"):
            if key in runs[0]:
                value = statistics.median(r[key] for r in runs)
                other.append(f"{key}={human_bytes(value) if 'bytes' in key else int(value)}")
        lines.append(
            f"| {case} | {statistics.median(seconds):.3f} s | {min(seconds):.3f} s | {max(seconds):.3f} s "
            f"| {median(results, case, 'cpu_seconds'):.3f} s | {int(median(results, case, 'faults'))} "
            f"| {human_bytes(median(results, case, 'rss_before'))} "
            f"| {human_bytes(statistics.median(extra))} / {human_bytes(max(extra))} | {', '.join(other)} |")
    return "\n".join(lines)


def machine_table(info: Dict[str, str]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    return "\n".join(lines)


METHOD = """\
How it measures:

- **Data**: a model-like state dict (decoder-only transformer: embeddings, attention q/k/v/o with
  biases, gated MLP, norms, LM head), half fp32 and half bf16 by bytes. `save_file` is given the same
  dict by every library (torch tensors for the torch rows; numpy arrays, bf16 from `ml_dtypes`, for the
  numpy rows). The read cases read one file written by `safetensors` (ours writes byte-identical files;
  the setup checks it), `torch.save` output for `torch.load`, and `numpy.savez` output for `np.load`.
- **Isolation**: every case runs in a fresh subprocess; imports and building the tensors are not
  timed, and a `gc.collect()` comes just before the timed operation.
  Files live in {fs_note}.
  The cases of one repetition run back to back, ours next to its peers, the order reversed every
  other repetition; each number is the median of `--repeat` repetitions.
- **Fresh memory**: a VM with free page reporting (like this one) hands freed memory back to the
  hypervisor, and the first touch of such a page costs a host fault: copies into it run several times
  slower, at random. So just before the timed operation each subprocess touches and frees as much
  memory as the case will need (and, for saves on tmpfs, writes and deletes a file of the model's
  size), so that every library gets pages the host already backs. `--no-prime` turns this off.
- **Durability**: `safeckpt` writes to a temporary file, fsyncs it, renames it and fsyncs the
  directory; `safetensors`, `torch.save` and `numpy.savez` do not fsync. On tmpfs an fsync costs
  nothing, which is why the run uses /dev/shm; on a disk the save rows would compare a durable write with
  one that is not.
- **Memory**: *extra peak RSS* is the process's peak RSS during the timed operation (VmHWM, reset just
  before it through /proc/self/clear_refs) minus its RSS just before it, i.e. beyond the tensors
  themselves. For mmap loads it includes file pages mapped into the process.
- **Lazy load** times `load_file` alone (tensors are views of a map, nothing read yet).
  **Read every page** times `load_file` plus reading one byte of every 4 KiB page of every tensor (the
  same function for every library): all bytes come into the process, nothing more is computed.
- **copy=True** is `safeckpt.load_file(..., copy=True)` (pread into owned arrays), against copying an
  in-memory array of the same size into a freshly allocated one (`np.copyto`) in the same run.
- **get_slice** reads row {row} of a {rows}×{cols} fp32 tensor ({row_bytes} a row, {tensor_bytes} in
  all): with `backend="pread"` the bytes read are `SafetensorsFile.bytes_read`; with mmap, the bytes of
  the file resident in the process's map (`/proc/self/smaps` Rss), against reading the whole tensor.
"""


def markdown(info: Dict[str, str], command: str, summary: str, table: List[Row], results: Results,
             order: List[str], notes: List[str]) -> str:
    tmpfs = "tmpfs" in info.get("directory", "")
    fs_note = "a tmpfs directory (always in memory, so the page cache is warm and fsync is free)" if tmpfs \
        else f"`{info.get('directory')}`, not a tmpfs: each read case reads its file once before timing"
    rows_, cols = SLICE_SHAPE
    method = METHOD.format(fs_note=fs_note, row=SLICE_ROW, rows=rows_, cols=cols, row_bytes=human_bytes(ROW_BYTES),
                           tensor_bytes=human_bytes(rows_ * cols * 4))
    failed = [r for r in table if r.verdict in ("FAIL", "error")]
    floors = [r for r in table if r.verdict in ("pass", "FAIL", "error")]
    verdict = (f"{len(floors) - len(failed)} of {len(floors)} floors pass" +
               (": " + "; ".join(f"{r.label} vs {r.peer_label}" for r in failed) + " fail" if failed else "."))
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` (see `benchmarks/`); rerun it to refresh this file.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        summary,
        "",
        "## Results",
        "",
        "Times are medians. Ratios are ours / theirs in time (lower is better), except bandwidth (higher is "
        "better) and bytes touched; *ratio of bests* is the same ratio from each side's fastest repetition, "
        "less sensitive to a noisy machine. Floors are judged on the medians. Rows without a floor are for "
        "reference.",
        "",
        comparison_table(table),
        "",
        verdict,
        "",
        "## Machine",
        "",
        machine_table(info),
        "",
        "## Method",
        "",
        method,
    ]
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    parts += ["## Every case", "", details_table(results, order), ""]
    return "\n".join(parts)
