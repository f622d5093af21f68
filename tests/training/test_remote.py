"""CheckpointManager over fsspec: a real S3-compatible server on loopback (moto) and memory://.

Object stores have no rename: a checkpoint is its data objects, then its
manifest. These tests check what that promises: nothing without a manifest
is listed, leftovers of a crashed save are cleaned only when they are ours
and old, and every byte is still verified on restore.
"""

from __future__ import annotations

import json
import sys
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fsspec = pytest.importorskip("fsspec")

from safeckpt.errors import CheckpointError, IntegrityError  # noqa: E402
from safeckpt.format.checkpoint_dir import inspect_directory  # noqa: E402
from safeckpt.training.manager import CheckpointManager  # noqa: E402

BUCKET = "checkpoints"
TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free loopback port, with one bucket, for this module's tests."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(params=["s3", "memory"])
def remote(request) -> tuple[str, dict]:
    """(URL of a fresh, empty run directory, storage_options) on each backend."""
    run = f"run-{uuid.uuid4().hex[:12]}"
    if request.param == "memory":
        yield f"memory://{run}", {}
        fsspec.filesystem("memory").rm(f"/{run}", recursive=True)
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    yield f"s3://{BUCKET}/{run}", {"key": "test", "secret": "test",
                                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def filesystem(url: str, options: dict):
    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def state_of(step: int) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(32, 16), "b": torch.arange(16, dtype=torch.bfloat16)},
            "moments": np.full(100, step, np.float64), "step": step, "tag": f"step {step}"}


def assert_state(restored: dict, step: int) -> None:
    expected = state_of(step)
    assert torch.equal(restored["model"]["w"], expected["model"]["w"])
    assert restored["model"]["b"].dtype == torch.bfloat16 and torch.equal(restored["model"]["b"], expected["model"]["b"])
    assert restored["moments"].dtype == np.float64 and np.array_equal(restored["moments"], expected["moments"])
    assert restored["step"] == step and restored["tag"] == f"step {step}"


def test_save_list_restore_and_retention(remote):
    url, options = remote
    with CheckpointManager(url, keep_last=2, storage_options=options) as mgr:
        for step in (9, 1000, 10, 100):
            mgr.save(step, state_of(step), metrics={"loss": 1.0 / step})
        assert [info.step for info in mgr.list()] == [100, 1000]
        assert [info.path for info in mgr.list()] == [f"{url}/step-00000100", f"{url}/step-00001000"]
        assert_state(mgr.restore("latest"), 1000)
        assert_state(mgr.restore(100), 100)
        assert mgr.verify().ok
    fs, root = filesystem(url, options)
    # The pruned checkpoints' objects are gone, not just their manifests.
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)) == ["step-00000100", "step-00001000"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/step-00001000", detail=False)) == \
        [MANIFEST, STATE, TENSORS]
    manifest = json.loads(fs.cat_file(f"{root}/step-00001000/{MANIFEST}"))
    assert manifest["step"] == 1000 and manifest["metrics"] == {"loss": 0.001}


def test_async_save_and_keep_best(remote):
    url, options = remote
    with CheckpointManager(url, keep_last=1, keep_best=1, monitor="loss", async_save=True,
                           storage_options=options) as mgr:
        state = state_of(1)
        mgr.save(1, state, metrics={"loss": 0.1})
        state["model"]["w"].fill_(-1.0)  # training goes on at once: the snapshot must not change
        for step, loss in ((2, 0.5), (3, float("nan")), (4, 0.9)):
            mgr.save(step, state_of(step), metrics={"loss": loss})
        mgr.wait()
        assert [info.step for info in mgr.list()] == [1, 4]
        assert_state(mgr.restore("best"), 1)


def test_a_checkpoint_without_its_manifest_is_never_listed(remote):
    url, options = remote
    with CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(5, state_of(5))
    fs, root = filesystem(url, options)
    # What a save cut off before its manifest leaves: the data objects of a newer step.
    for step in (7, 3):
        for name in (TENSORS, STATE):
            fs.pipe_file(f"{root}/step-{step:08d}/{name}", fs.cat_file(f"{root}/step-00000005/{name}"))
    fs.pipe_file(f"{root}/step-00000002/{TENSORS}", b"partial")
    fs.pipe_file(f"{root}/step-00000002/notes.txt", b"not ours")
    fs.pipe_file(f"{root}/step-final/{TENSORS}", b"not a step")
    with CheckpointManager(url, storage_options=options) as mgr:
        assert [info.step for info in mgr.list()] == [5]
        assert_state(mgr.restore("latest"), 5)
        with pytest.raises(CheckpointError, match="no checkpoint of step 7"):
            mgr.restore(7)
    fs.invalidate_cache()
    left = sorted(path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False))
    # Step 3 was ours and older than the newest commit: cleaned. Step 7 may be a save in flight,
    # step 2 holds a stranger's file, step-final is not a step: all kept.
    assert left == ["step-00000002", "step-00000005", "step-00000007", "step-final"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/step-00000002", detail=False)) == \
        ["notes.txt", TENSORS]
    # A save of step 7 replaces the crashed one.
    with CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(7, state_of(7))
        assert_state(mgr.restore("latest"), 7)


def test_corruption_is_found_and_named(remote):
    url, options = remote
    with CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(1, state_of(1))
    fs, root = filesystem(url, options)
    path = f"{root}/step-00000001/{TENSORS}"
    manifest = json.loads(fs.cat_file(f"{root}/step-00000001/{MANIFEST}"))
    begin, end = manifest["files"][TENSORS]["tensors"]["model/w"]["range"]
    original = fs.cat_file(path)
    damaged = bytearray(original)
    damaged[(begin + end) // 2] ^= 0x01
    fs.pipe_file(path, bytes(damaged))
    with CheckpointManager(url, storage_options=options) as mgr:
        report = mgr.verify()
        assert not report.ok and report.failures[0].tensor == "model/w"
        with pytest.raises(IntegrityError) as info:
            mgr.restore(1)
        assert info.value.tensor == "model/w" and f"{url}/step-00000001/{TENSORS}" in str(info.value)
        fs.pipe_file(path, original)
        assert mgr.verify().ok
        assert_state(mgr.restore(1), 1)


def test_an_existing_step_is_not_overwritten(remote):
    url, options = remote
    with CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(1, state_of(1))
        with pytest.raises(CheckpointError, match="already saved"):
            mgr.save(1, state_of(2), force=True)
        assert_state(mgr.restore(1), 1)


def test_listing_without_a_manager_changes_nothing(remote):
    url, options = remote
    with CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(3, state_of(3), metrics={"loss": 0.5})
    listing = inspect_directory(url, options)
    assert [(info.step, info.metrics) for info in listing.checkpoints] == [(3, {"loss": 0.5})]
    assert listing.damaged == []


def test_storage_options_on_a_local_path_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="storage_options apply to fsspec URLs"):
        CheckpointManager(tmp_path, storage_options={"key": "x"})


def test_a_missing_fsspec_is_named_with_the_command_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec now raises ImportError
    with pytest.raises(CheckpointError, match="pip install fsspec"):
        CheckpointManager("s3://bucket/run")


def test_a_missing_protocol_package_is_named():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(CheckpointError, match="gcsfs"):
        CheckpointManager("gs://bucket/run")
