"""What a benchmark subprocess measures about itself: RSS, its peak, page faults, mapped pages.

Linux only for the peak reset (`/proc/self/clear_refs`, "5" resets VmHWM to the
current RSS, Linux >= 4.0); elsewhere the peak falls back to ru_maxrss, which
also counts whatever happened before the timed operation.
"""

from __future__ import annotations

import os
import resource
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss() -> int:
    """Resident set size now, in bytes."""
    try:
        return _status_kib("VmRSS") * 1024
    except (OSError, KeyError):  # not Linux: psutil if present
        import psutil
        return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Make the peak RSS equal the current RSS; False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size (since the last reset_peak where it worked), in bytes."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def mapped_rss(path: str) -> int:
    """Bytes of `path` resident in this process's mappings of it (from /proc/self/smaps)."""
    path = os.path.realpath(path)
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                parts = line.split(None, 5)
                inside = len(parts) == 6 and parts[5].strip() == path
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def prime_memory(nbytes: int) -> None:
    """Touch and free `nbytes` of fresh memory, so that the timed operation gets pages the host backs.

    On a VM with free page reporting (virtio-balloon) pages freed a few seconds ago
    are handed back to the hypervisor, and the first touch of each costs a host
    fault: a fresh process would pay for it at random, in whichever case it
    happens to allocate or write first. Memory freed just now is reused first.
    """
    import numpy as np

    if nbytes > 0:
        buffer = np.empty(nbytes, dtype=np.uint8)
        buffer[::4096] = 1
        del buffer


def prime_file(directory: str, nbytes: int) -> None:
    """Write and delete a file of `nbytes` in `directory`: fresh page-cache pages for a timed write."""
    import numpy as np

    block = np.ones(16 << 20, dtype=np.uint8)
    name = os.path.join(directory, ".prime")
    with open(name, "wb", buffering=0) as f:
        for start in range(0, nbytes, block.size):
            f.write(memoryview(block)[:min(block.size, nbytes - start)])
    os.unlink(name)
