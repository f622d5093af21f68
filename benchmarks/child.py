"""One benchmark subprocess: `python -m benchmarks.child '<json config>'`.

Runs the named cases one after another (normally just one: a fresh process per
case) and prints one line, ``BENCH-RESULT <json list>``, with for each case the
seconds of its timed operation, RSS before it, and the peak RSS during it.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time

from . import probes
from .cases import CASES, Measured

RESULT_PREFIX = "BENCH-RESULT "


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_case(name: str, cfg: dict) -> dict:
    if cfg.get("out") and os.path.exists(cfg["out"]):
        os.unlink(cfg["out"])
    gc.collect()
    op = CASES[name](cfg)
    gc.collect()
    # Fresh pages the host already backs, for the memory and the file pages the case will need.
    probes.prime_memory(cfg.get("prime", 0))
    if name.startswith("save.") and cfg.get("tmpfs"):
        probes.prime_file(cfg["dir"], cfg.get("prime", 0))
    before = probes.rss()
    exact_peak = probes.reset_peak()
    faults, cpu = probes.minor_faults(), _cpu_seconds()
    start = time.perf_counter()
    value = op()
    seconds = time.perf_counter() - start
    faults, cpu = probes.minor_faults() - faults, _cpu_seconds() - cpu
    peak = probes.peak_rss()
    extras = value.extras if isinstance(value, Measured) else {}
    del value, op
    return {"case": name, "seconds": seconds, "rss_before": before, "peak_rss": peak,
            "peak_extra": peak - before, "exact_peak": exact_peak, "faults": faults, "cpu_seconds": cpu, **extras}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    results = [run_case(name, cfg) for name in cfg["cases"]]
    print(RESULT_PREFIX + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
