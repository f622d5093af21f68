"""Fuzz the scan against the real loaders, at scale: never "safe" where a loader runs code.

    python scripts/fuzz_scan.py --examples 20000 [--seed 0] [--out fuzz-disagreements/] [--with-corpus]

Mutates real seed files (tests/ops/test_scan_differential.py: `make_seeds`, `mutate`),
and with --with-corpus the hostile files of tests/ops/evasion_corpus.py too (their
payloads only touch files in a temporary directory, and the hook refuses them anyway),
asks tests/loader_oracle.py which globals torch.load(weights_only=False), pickle.load
and numpy.load(allow_pickle=True) reach (in a hooked subprocess that refuses every
global outside the allowlist), and scans every mutant that reached one. A mutant the
scan calls "safe" is a disagreement: it is saved under --out with a .json note of
what the loaders reached. Prints a summary; exits 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: its tests are a package

from tests.loader_oracle import LoaderOracle  # noqa: E402
from tests.ops.evasion_corpus import make_corpus  # noqa: E402
from tests.ops.test_scan_differential import Seed, check, make_seeds, mutate  # noqa: E402

# Disagreements printed in full; the rest are counted (all are saved).
SHOWN = 20


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="mutants to try")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the campaign")
    parser.add_argument("--out", type=Path, default=Path("fuzz-disagreements"),
                        help="where disagreeing files are saved")
    parser.add_argument("--with-corpus", action="store_true",
                        help="mutate the evasion corpus (files under 1 MB) as well as the real seeds")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    start = time.monotonic()
    reached = collections.Counter()      # seed -> mutants that reached a refused global
    loaders = collections.Counter()      # loader -> mutants where it reached one
    verdicts = collections.Counter()     # scan verdicts of those mutants
    disagreements = []
    with tempfile.TemporaryDirectory() as tmp, LoaderOracle() as oracle:
        seeds = make_seeds(Path(tmp))
        if args.with_corpus:
            seeds += [Seed(i.name, i.path.read_bytes(), i.path.suffix) for i in make_corpus(Path(tmp) / "corpus")
                      if i.runs and i.path.stat().st_size < 1 << 20]
        for n in range(args.examples):
            seed = rng.choice(seeds)
            mutant = mutate(seed.data, rng)
            path = Path(tmp) / f"mutant{seed.suffix}"
            path.write_bytes(mutant)
            outcome = check(oracle, path)
            if outcome.refused:
                reached[seed.name] += 1
                verdicts[outcome.verdict] += 1
                loaders.update({r.split(":")[0] for r in outcome.refused})
            if outcome.disagrees:
                args.out.mkdir(parents=True, exist_ok=True)
                kept = args.out / f"disagreement-{n:06d}-{seed.name}{seed.suffix}"
                kept.write_bytes(mutant)
                kept.with_suffix(kept.suffix + ".json").write_text(
                    json.dumps({"seed": seed.name, "reached": outcome.refused}, indent=1))
                disagreements.append((kept, outcome.refused))
                if len(disagreements) <= SHOWN:
                    print(f"DISAGREEMENT {kept}: scan says safe; {', '.join(outcome.refused)}", flush=True)
            if (n + 1) % 500 == 0:
                print(f"... {n + 1} examples, {sum(reached.values())} reached a refused global, "
                      f"{len(disagreements)} disagreements ({time.monotonic() - start:.0f} s)", flush=True)

    total = sum(reached.values())
    print(f"\n{args.examples} examples in {time.monotonic() - start:.0f} s (campaign seed {args.seed})")
    print(f"reached a global outside the allowlist: {total} "
          f"(by loader {dict(loaders)}; most by seed {dict(reached.most_common(8))})")
    print(f"scan verdicts of those: {dict(verdicts)}")
    print(f"disagreements (a loader reached one, the scan said safe): {len(disagreements)}"
          + (f", saved under {args.out}/" if disagreements else ""))
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
