"""The evasion corpus against the real loaders and against the scan.

Each item of `evasion_corpus` is a file that a real loader runs; these tests prove
it (the loader, in a subprocess, creates the item's canary), then ask the scan for
"malicious" through the API and the command line. Nothing in this process ever
loads a corpus file: the real runs use their own copy of the corpus, and the
scan's copy must end the module with every canary absent.
"""

from __future__ import annotations

import io
import json
import pickletools
import tarfile
import zipfile
from pathlib import Path

import pytest

from safeckpt.ops.scan import scan

from tests.cli.runner import CONSOLE_SCRIPT, run_script
from tests.loader_oracle import LOADERS
from tests.ops.evasion_corpus import MAGIC_PICKLE, ROOT_CAUSES, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The copy the scan reads: its canaries must never appear."""
    return make_corpus(tmp_path_factory.mktemp("evasion"))


def test_corpus_is_well_formed(corpus):
    names = [item.name for item in corpus]
    assert len(names) == len(set(names))
    assert {item.root_cause for item in corpus} == set(ROOT_CAUSES)
    assert {item.loader for item in corpus} == set(LOADERS)
    for item in corpus:
        assert item.path.is_file() and item.canary.parent == item.path.parent / "canaries"
        assert not item.canary.exists()


@pytest.mark.slow
def test_each_item_runs_under_its_loader(tmp_path_factory, oracle):
    """(a) The real loader, in a subprocess and without the hook, creates each canary."""
    pytest.importorskip("torch")  # one of the loaders
    items = make_corpus(tmp_path_factory.mktemp("real"))
    runs = {}
    for loader in LOADERS:
        group = [i for i in items if i.loader == loader]
        runs.update(oracle.run_for_real([i.path for i in group], loader))
    wrong = [f"{i.name} ({i.loader}): canary {'created' if i.canary.exists() else 'missing'}, "
             f"run {runs[i.path]}" for i in items if i.canary.exists() != i.runs]
    assert not wrong, "\n".join(wrong)


def test_the_hooked_loaders_reach_the_expected_global(corpus, oracle):
    """The oracle sees each item's dangerous global (and refuses it: no canary appears)."""
    pytest.importorskip("torch")  # one of the loaders
    wrong = []
    for item in corpus:
        result = oracle.run(item.path, [item.loader])
        if (item.expect in {r.qualname for r in result.refused}) != item.runs:
            wrong.append(f"{item.name}: {result.outcomes} {[r.qualname for r in result.refused]}")
        assert not item.canary.exists(), item.name
    assert not wrong, "\n".join(wrong)


def linear_globals(data: bytes) -> list:
    """Globals named by the pickles of `data` read back to back the way pickle.loads would
    (frames ignored), parsed by pickletools: nothing is loaded."""
    found, pos = [], 0
    while pos < len(data):
        strings: list = []
        try:
            for op, arg, at in pickletools.genops(io.BytesIO(data[pos:])):
                if op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                end = at
        except Exception:  # noqa: BLE001 - the linear reading breaks: it saw what it saw
            return found
        pos += end + 1
    return found


def test_frame_decoys_hide_the_payload_from_a_linear_reader(corpus):
    """The frame items matter: read without the file semantics, they show nothing dangerous."""
    for item in corpus:
        if item.root_cause != "frame-semantics":
            continue
        data = item.path.read_bytes()
        if data[:4] == b"PK\x03\x04":
            data = zipfile.ZipFile(item.path).read("archive/data.pkl")
        elif item.name.endswith("tar_storages"):
            with tarfile.open(item.path) as tar:
                data = tar.extractfile("storages").read()
        assert item.expect not in linear_globals(data), item.name


def test_polyglots_are_both_formats(corpus):
    import numpy as np
    safe_open = pytest.importorskip("safetensors").safe_open

    items = {i.name: i for i in corpus}
    with safe_open(items["safetensors_zip_polyglot"].path, "np") as f:
        assert list(f.keys()) == ["zip"]
    assert items["safetensors_zip_polyglot"].path.read_bytes()[:4] == b"PK\x03\x04"
    array = np.load(items["npy_tar_polyglot"].path)  # allow_pickle=False: nothing can run
    assert array.dtype == np.float32 and array.size == 0
    for name in ("npy_tar_polyglot", "legacy_stream_tar_polyglot"):
        with tarfile.open(items[name].path) as tar:
            assert "storages" in tar.getnames()
    stream = items["legacy_stream_tar_polyglot"].path.read_bytes()
    assert linear_globals(stream) == []  # magic, 1001, sys_info, {'w': 1}, []
    assert stream.startswith(MAGIC_PICKLE)


def test_scan_grades_every_item_malicious(corpus):
    """(b) The API: verdict "malicious", exit code 1."""
    failures = []
    for item in corpus:
        report = scan(item.path)
        if report.verdict != "malicious" or report.exit_code() != 1:
            failures.append(f"{item.name} [{item.root_cause}, {item.loader}]: {report.verdict} "
                            f"(exit {report.exit_code()}, format {report.format}, error {report.error}, "
                            f"findings {[(f.severity, f.kind, f.what) for f in report.findings][:4]})")
        assert not item.canary.exists(), item.name
    assert not failures, f"{len(failures)} of {len(corpus)} items not graded malicious:\n" + "\n".join(failures)


def run_cli(*paths: Path) -> tuple[int, dict]:
    """`safeckpt scan --json PATHS...` as the installed script: its exit code and document."""
    done = run_script("scan", "--json", *paths, timeout=600)
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the safeckpt command is not installed next to python")
def test_scan_command_grades_every_item_malicious(corpus):
    """(b) The command: one file per root cause alone, then every file in one call, then the directory."""
    failures = []
    for cause in ROOT_CAUSES:
        item = next(i for i in corpus if i.root_cause == cause)
        code, out = run_cli(item.path)
        if (code, out["verdict"], out["exit_code"]) != (1, "malicious", 1):
            failures.append(f"alone: {item.name}: exit {code}, {out['verdict']}")
    code, out = run_cli(*(i.path for i in corpus))
    assert code == out["exit_code"]
    by_path = {r["path"]: r for r in out["reports"]}
    failures += [f"{i.name}: {by_path[str(i.path)]['verdict']}" for i in corpus
                 if by_path[str(i.path)]["verdict"] != "malicious"]
    directory = corpus[0].path.parent
    code, out = run_cli(directory)
    assert (code, out["verdict"]) == (1, "malicious"), out["verdict"]
    files = {r["path"]: r["verdict"] for r in out["reports"][0]["files"]}
    failures += [f"in the directory: {i.name}: {files.get(str(i.path), 'not scanned')}" for i in corpus
                 if files.get(str(i.path)) != "malicious"]
    assert not any(i.canary.exists() for i in corpus)
    assert not failures, "\n".join(failures)


def test_nothing_in_this_process_created_a_canary(corpus):
    """(c) Last: after every scan above, the scan's copy has no canary at all."""
    canaries = corpus[0].canary.parent
    assert list(canaries.iterdir()) == []
