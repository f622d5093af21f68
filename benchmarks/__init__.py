"""Side-by-side benchmarks of safeckpt against its peers.

Run from the repository root::

    python -m benchmarks                 # 1 GiB model-like state dict, 5 repeats, writes BENCHMARKS.md
    python -m benchmarks --size 256MiB --repeat 3
    python -m benchmarks --quick --no-write   # a smoke run of a few seconds

Every timed case runs in a fresh subprocess (`benchmarks.child`), so its peak
RSS is its own and the page cache is in a known state; the cases of one
repetition run back to back (ours next to each peer), and the median of the
repetitions is reported. `runner` orchestrates, `statedict` builds the
model-like tensors, `cases` holds what each subprocess does, `report` turns
the medians into the table of BENCHMARKS.md.
"""
