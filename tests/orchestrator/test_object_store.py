"""The object store of a sweep on `storage_path: s3://...`, against a real S3 server (moto's, on 127.0.0.1)
through real pyarrow S3: a checkpoint counts only once its manifest (size, sha256) is written after
its data and matches it, and its bytes reach their final name whole (through a staging key), so an
upload interrupted midway never leaves a partial object, nor anything that resume would load.

Each interrupted upload is checked the way resume meets it: `store_sync.pull_trial` brings the trial
down into an empty folder, and `trainer.engine.checkpoint.load_latest` picks what resume would load.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.harness.s3_server import client, exported, s3_server
from tests.orchestrator.conftest import REPO
from trainer.engine.checkpoint import checkpoint_path, list_checkpoints, load_latest, save_atomic

BUCKET = "sweeps"
NAME = "random-all-1x-R18"
TRIAL = f"trials/{NAME}"  # the trial's keys under the sweep's root
MiB = 1 << 20
MANIFEST = ".manifest.json"


@pytest.fixture(scope="module")
def s3():
    """The server's environment, also in os.environ (pyarrow reads the endpoint and credentials there)."""
    with s3_server(BUCKET) as env, exported(env):
        yield env


@pytest.fixture
def prefix(s3, request) -> str:
    """The test's own prefix in the bucket."""
    return "fast/" + "".join(c if c.isalnum() else "-" for c in request.node.name)


@pytest.fixture
def store(prefix):
    from orchestrator.worker.object_store import ObjectStore

    return ObjectStore.from_uri(f"s3://{BUCKET}/{prefix}")


def _ckpt(folder: Path, iteration: int, numel: int = 16, fill: float = 0.0) -> Path:
    """A real trainer checkpoint (model + iteration) that `load_latest` loads."""
    import torch

    state = {"model": {"w": torch.full((numel,), fill)}, "iteration": iteration}
    return save_atomic(state, checkpoint_path(folder / "checkpoints", iteration))


def _key(iteration: int) -> str:
    return f"{TRIAL}/checkpoints/ckpt_{iteration:07d}.pt"


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _resume_sees(store, tmp: Path) -> tuple[list[int], int | None]:
    """(checkpoint iterations pulled, iteration load_latest picks) for the trial, pulled into an empty folder."""
    from orchestrator.worker.store_sync import pull_trial

    local = tmp / "pulled"
    pull_trial(store, NAME, local)
    found = load_latest(local / "checkpoints")
    return [i for i, _ in list_checkpoints(local / "checkpoints")], found[1]["iteration"] if found else None


def test_put_manifest_get_round_trip(store, tmp_path):
    path = _ckpt(tmp_path / "src", 3, numel=3 * MiB // 4)  # ~3 MiB: more than one read of the source
    store.put_file(path, _key(3))
    assert store.manifest(_key(3)) == _digest(path)
    listed = store.list(TRIAL)
    assert listed[_key(3)][0] == path.stat().st_size and _key(3) + MANIFEST in listed, listed
    out = tmp_path / "out" / "ckpt.pt"
    assert store.get_verified(_key(3), out) is True
    assert out.read_bytes() == path.read_bytes()
    assert store.manifest(_key(6)) is None  # never uploaded
    assert store.get_verified(_key(6), tmp_path / "out" / "none.pt") is False
    assert not (tmp_path / "out" / "none.pt").exists()
    assert _resume_sees(store, tmp_path) == ([3], 3)


class _Breaks:
    """A readable binary source that raises once `limit` bytes were read (a disk or network failure)."""

    def __init__(self, path: Path, limit: int):
        self.fh, self.limit, self.done = open(path, "rb"), limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.done >= self.limit:
            raise OSError("source failed midway (test)")
        data = self.fh.read(n if n is not None and n >= 0 else self.limit)
        self.done += len(data)
        return data

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> "_Breaks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_upload_failing_midway_leaves_nothing_resume_loads(store, tmp_path):
    """pyarrow completes a multipart upload whose writer raised (the partial bytes become an object): no
    such object may show under the final name (nor anywhere in the store: a staging copy goes), no
    manifest, and resume falls back to the committed checkpoint."""
    src = tmp_path / "src"
    store.put_file(_ckpt(src, 3), _key(3))
    big = _ckpt(src, 6, numel=4 * MiB)  # 16 MiB
    source = _Breaks(big, 6 * MiB)
    try:
        with pytest.raises(Exception):
            store.put_file(big, _key(6), source=source)
    finally:
        source.close()
    assert source.done >= 5 * MiB  # the upload really was under way
    assert store.manifest(_key(6)) is None
    assert sorted(store.list()) == [_key(3), _key(3) + MANIFEST], store.list()
    assert store.get_verified(_key(6), tmp_path / "six.pt") is False and not (tmp_path / "six.pt").exists()
    assert _resume_sees(store, tmp_path) == ([3], 3)
    print(f"object store: upload failing after {source.done // MiB} MiB of {big.stat().st_size // MiB} MiB left "
          f"no object and no manifest; resume loads iteration 3")


_UPLOADER = textwrap.dedent("""
    import sys, time
    from orchestrator.worker.object_store import ObjectStore

    uri, path, key = sys.argv[1:4]

    class Slow:
        # Hands out the file slowly (at most 1 MiB a read, 20 MiB/s) and prints the bytes handed out so far,
        # so the test can kill it mid-upload.
        def __init__(self):
            self.fh, self.done = open(path, "rb"), 0
        def read(self, n=-1):
            data = self.fh.read(min(n, 1 << 20) if n is not None and n >= 0 else 1 << 20)
            self.done += len(data)
            print(self.done, flush=True)
            time.sleep(len(data) / (20 << 20))
            return data
        def close(self):
            self.fh.close()
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.close()

    ObjectStore.from_uri(uri).put_file(path, key, source=Slow())
    print("uploaded", flush=True)
""")


def test_uploader_killed_midway_leaves_nothing_resume_loads(store, prefix, s3, tmp_path):
    """A process uploading a 64 MiB checkpoint is SIGKILLed once it is writing: no manifest, not pulled."""
    src = tmp_path / "src"
    store.put_file(_ckpt(src, 3), _key(3))
    big = _ckpt(src, 6, numel=16 * MiB)  # 64 MiB
    env = {**os.environ, **s3, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, f"s3://{BUCKET}/{prefix}", str(big), _key(6)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        handed = 0
        while handed < 24 * MiB:  # past the first multipart parts, far from the end
            line = proc.stdout.readline()
            assert line.strip().isdigit(), (line, proc.stderr.read() if proc.poll() is not None else "")
            handed = int(line)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert store.manifest(_key(6)) is None
    assert sorted(store.list()) == [_key(3), _key(3) + MANIFEST], store.list()
    assert _resume_sees(store, tmp_path) == ([3], 3)
    print(f"object store: uploader SIGKILLed after {handed // MiB} of 64 MiB were handed to it left no object "
          f"and no manifest; resume loads iteration 3")


@pytest.mark.parametrize("replacement", ["other size", "same size, other bytes"])
def test_manifest_not_matching_its_object_is_not_pulled(store, prefix, s3, tmp_path, replacement):
    """The object under a manifest replaced by another valid checkpoint (which would load): size or
    sha256 no longer match the manifest, so the checkpoint does not count."""
    src = tmp_path / "src"
    store.put_file(_ckpt(src, 3), _key(3))
    good = _ckpt(src, 6)
    store.put_file(good, _key(6))
    other = _ckpt(tmp_path / "other", 6, numel=32 if replacement == "other size" else 16, fill=1.0)
    assert (other.stat().st_size == good.stat().st_size) == (replacement != "other size")
    client(s3).put_object(Bucket=BUCKET, Key=f"{prefix}/{_key(6)}", Body=other.read_bytes())
    assert store.manifest(_key(6)) == _digest(good)  # the manifest still names the original bytes
    assert store.get_verified(_key(6), tmp_path / "six.pt") is False and not (tmp_path / "six.pt").exists()
    assert _resume_sees(store, tmp_path) == ([3], 3)
