"""The scan against the real loaders on mutated real files: never "safe" where a loader runs code.

Seeds are made here by the real libraries (a torch.save zip checkpoint, a legacy
``_use_new_zipfile_serialization=False`` file, an npz with an object array, plain
pickles). Each example mutates one (byte flips, insertions and deletions,
snippets of interesting opcodes spliced in at opcode boundaries or anywhere, zip
archives re-packed with a member mutated, renamed, duplicated, deflated or
flagged) and asks `loader_oracle` which globals ``torch.load(weights_only=False)``,
``pickle.load`` and ``numpy.load(allow_pickle=True)`` reach. Whenever one reaches
a global outside the allowlist that find_class would find (`Reached.resolvable`:
mutants often name ``"os.systemo fuzz'"`` or ``torch.FloatStosage``, which fail
before anything of them runs), ``scan(path).verdict`` must not be "safe".

Examples per run: ``SAFECKPT_FUZZ_EXAMPLES`` (default 150). A failing file is kept
under ``SAFECKPT_FUZZ_SAVE`` (default: the test's temporary directory) and named
in the failure. ``scripts/fuzz_scan.py --examples 20000`` runs a long campaign
with the same mutations and prints a summary.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import random
import struct
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeckpt.ops.scan import scan

from tests.loader_oracle import LOADERS, LoaderOracle
from tests.ops.evasion_corpus import DIVERGENCES, Member, zip_file

EXAMPLES = int(os.environ.get("SAFECKPT_FUZZ_EXAMPLES", "150"))

# Opcode runs that make a mutant interesting. The command never runs: the oracle
# refuses os.system before it is imported, and the scan executes nothing.
HOSTILE = [
    b"cos\nsystem\n(S'echo fuzz'\ntR",
    b"cos\nsystem\n(S'echo fuzz'\ntR0",
    b"cposix\nsystem\nX\x09\x00\x00\x00echo fuzz\x85R0",
    b"\x8c\x02os\x8c\x06system\x93\x8c\x09echo fuzz\x85R0",
    b"\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R",
    b"c__builtin__\neval\n(S'1'\ntR",
    b"(S'echo fuzz'\nios\nsystem\n",
    b"csubprocess\ncall\n]S'true'\na\x85R",
    b"ccollections\nOrderedDict\n)R",
    b"cclick\nopen_file\n(S'/dev/null'\nS'r'\ntR",       # a library call no denylist names
    b"\x8c\x11safetensors.numpy\x8c\tsave_file\x93}\x8c\t/dev/null\x86R",
]
STRUCTURE = [
    b"(", b"0", b"1", b".", b"N0", b"N", b"t", b"R", b"b", b"Q", b"\x81", b"\x85",
    b"\x80\x02", b"\x80\x04", b"\x80\x05", b"\x95" + struct.pack("<Q", 64), b"\x95" + struct.pack("<Q", 140_000),
    b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"\x93NUMPY\x01\x00",
    b"GGUF", b"ustar\x0000",
    *(run for run in DIVERGENCES.values() if len(run) < 200),
]
WHOLE_PICKLES = [b"cos\nsystem\n(S'echo fuzz'\ntR.", b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x01x\x85R."]


class Seed(NamedTuple):
    name: str
    data: bytes
    suffix: str


def make_seeds(directory: Path) -> list[Seed]:
    """Small real files, written by torch, numpy and pickle."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    state = {"model": model.state_dict(), "epoch": 3, "lr": [0.1, 0.01], "name": "run"}
    seeds = []

    def add(name: str, suffix: str, write) -> None:
        path = directory / f"{name}{suffix}"
        write(path)
        seeds.append(Seed(name, path.read_bytes(), suffix))

    add("torch_zip", ".pt", lambda p: torch.save(state, p))
    add("torch_legacy", ".pt", lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    add("npz_object", ".npz", lambda p: np.savez(p, w=np.ones(3, np.float32),
                                                  o=np.array([1, "a", None], dtype=object)))
    add("pickle_p2", ".pkl", lambda p: p.write_bytes(pickle.dumps({"w": np.arange(3), "s": "x"}, protocol=2)))
    add("pickle_p4", ".pkl", lambda p: p.write_bytes(
        pickle.dumps({"w": list(range(40)), "t": (1.5, b"xy"), "n": None}, protocol=4)))
    return seeds


# --- mutations --------------------------------------------------------------------------------

def opcode_boundaries(data: bytes, limit: int = 4000) -> list:
    """Offsets where an opcode starts, reading the pickles with pickletools (parse only);
    an npy file's pickle starts after its header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pickletools on mutated STRING escapes
        return _opcode_boundaries(data, limit)


def _opcode_boundaries(data: bytes, limit: int) -> list:
    found, pos = [], 0
    if data[:6] == b"\x93NUMPY" and len(data) > 10:
        pos = 10 + struct.unpack_from("<H", data, 8)[0] if data[6] == 1 else 12 + struct.unpack_from("<I", data, 8)[0]
    while pos < len(data) and len(found) < limit:
        try:
            for _op, _arg, at in pickletools.genops(io.BytesIO(data[pos:])):
                found.append(pos + at)
                end = pos + at
        except Exception:  # noqa: BLE001 - stop at whatever breaks
            break
        pos = end + 1
    return found


def position(data: bytes, rng: random.Random) -> int:
    boundaries = opcode_boundaries(data) if rng.random() < 0.6 else []
    return rng.choice(boundaries) if boundaries else rng.randint(0, len(data))


def flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    at = rng.randrange(len(data))
    value = data[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return data[:at] + bytes([value]) + data[at + 1:]


def insert(data: bytes, rng: random.Random) -> bytes:
    at = rng.randint(0, len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]


def delete(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 16):]


def splice(data: bytes, rng: random.Random) -> bytes:
    at = position(data, rng)
    snippet = rng.choice(HOSTILE if rng.random() < 0.5 else STRUCTURE)
    if rng.random() < 0.25:  # overwrite instead of insert
        return data[:at] + snippet + data[at + len(snippet):]
    return data[:at] + snippet + data[at:]


def append(data: bytes, rng: random.Random) -> bytes:
    """A whole pickle after the data, or in front of it."""
    extra = rng.choice(WHOLE_PICKLES)
    return data + extra if rng.random() < 0.7 else extra + data


BYTE_MUTATIONS = (flip, insert, delete, splice, splice, splice, append)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 3)):
        data = rng.choice(BYTE_MUTATIONS)(data, rng)
    return data


def repack(data: bytes, rng: random.Random) -> bytes:
    """Re-pack a zip: one member mutated, renamed (case), duplicated, dropped, deflated or flagged."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [Member(i.filename, z.read(i)) for i in z.infolist()]
    except Exception:  # noqa: BLE001 - not a zip any more: mutate the bytes instead
        return mutate_bytes(data, rng)
    if not members:
        return data
    pickles = [i for i, m in enumerate(members) if m.name.endswith((".pkl", ".npy"))]
    i = rng.choice(pickles) if pickles and rng.random() < 0.8 else rng.randrange(len(members))
    m = members[i]
    action = rng.choice(("mutate", "mutate", "mutate", "case", "duplicate", "drop", "deflate", "flags",
                         "move_first"))
    if action == "mutate":
        members[i] = m._replace(data=mutate_bytes(m.data, rng))
    elif action == "case":
        members[i] = m._replace(name=m.name.upper() if rng.random() < 0.5 else m.name.swapcase())
    elif action == "duplicate":
        members.insert(rng.randint(0, len(members)), m._replace(data=mutate_bytes(m.data, rng)))
    elif action == "drop" and len(members) > 1:
        del members[i]
    elif action == "deflate":
        members[i] = m._replace(method=8)
    elif action == "flags":
        members[i] = m._replace(local_flags=rng.choice((1, 8)), crc=rng.choice((None, 0)))
    elif action == "move_first":
        members.insert(0, members.pop(i))
    return zip_file(members)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutant of a seed."""
    if data[:4] == b"PK\x03\x04" and rng.random() < 0.6:
        data = repack(data, rng)
        return mutate_bytes(data, rng) if rng.random() < 0.2 else data
    return mutate_bytes(data, rng)


# --- the property ---------------------------------------------------------------------------

class Outcome(NamedTuple):
    refused: list            # "loader: module.name" for every resolvable global outside the allowlist
    verdict: Optional[str]   # the scan's, when a loader reached such a global

    @property
    def disagrees(self) -> bool:
        return bool(self.refused) and self.verdict == "safe"


def check(oracle: LoaderOracle, path: Path) -> Outcome:
    result = oracle.run(path, LOADERS)
    refused = sorted({f"{r.loader}: {r.qualname}" for r in result.refused if r.resolvable})
    return Outcome(refused, scan(path).verdict if refused else None)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    pytest.importorskip("torch")
    return make_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return Path(os.environ.get("SAFECKPT_FUZZ_SAVE") or tmp_path_factory.mktemp("fuzz"))


def test_seeds_are_safe_and_load(seeds, oracle, workdir):
    for seed in seeds:
        path = workdir / f"seed-{seed.name}{seed.suffix}"
        path.write_bytes(seed.data)
        assert check(oracle, path).refused == [], seed.name
        assert scan(path).verdict == "safe", seed.name


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_scan_is_never_safe_where_a_loader_reaches_a_refused_global(seeds, oracle, workdir, data):
    seed = data.draw(st.sampled_from(seeds), label="seed")
    rng = data.draw(st.randoms(use_true_random=False), label="rng")
    mutant = mutate(seed.data, rng)
    path = workdir / f"mutant{seed.suffix}"
    path.write_bytes(mutant)
    outcome = check(oracle, path)
    if outcome.disagrees:
        kept = workdir / f"disagreement-{seed.name}-{abs(hash(mutant)) % 10**8:08d}{seed.suffix}"
        kept.write_bytes(mutant)
        pytest.fail(f"scan says safe, but {outcome.refused}; the file is kept at {kept}")
