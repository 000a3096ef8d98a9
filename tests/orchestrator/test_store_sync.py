"""An object-store sweep's folder replication (`orchestrator.worker.store_sync`) and the driver's mirror
(`orchestrator.state.mirror`), against moto's S3 server through real pyarrow: streams fence older
attempts off, a rewritten metrics.jsonl starts a generation, scratch is never ahead of the store,
pruning reaches the store, and the mirror's metrics.jsonl is what the newest stream holds."""

from __future__ import annotations

import json
import os

import pytest

from bench.harness.s3_server import exported, s3_server
from orchestrator.state.mirror import SweepMirror
from orchestrator.worker.object_store import ObjectStore
from orchestrator.worker.store_sync import TrialSync, newest_view, pull_trial
from trainer.trial_dir import ATTEMPTS, MANIFEST, TrialDir

NAME = "random-all-1x-R18"


@pytest.fixture(scope="module")
def s3():
    with s3_server("units") as env, exported(env):
        yield env


@pytest.fixture
def store(s3, request) -> ObjectStore:
    return ObjectStore.from_uri(f"s3://units/{request.node.name}")


def _rows(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _write_ckpt(folder: TrialDir, it: int, size: int = 1000) -> None:
    folder.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    folder.checkpoint(it).write_bytes(os.urandom(size))


def test_attempts_stream_and_the_newest_wins(store, tmp_path):
    a = TrialDir(tmp_path / "node1" / NAME).make()
    for step in (1, 2, 3):
        a.append_metrics(step, {"train/loss": 1.0 / step})
    _write_ckpt(a, 3)
    a.add_row(ATTEMPTS, {"attempt": 1, "start_iter": 0})
    first = TrialSync(store, a, attempt=1)
    first.push()
    a.append_metrics(4, {"train/loss": 0.2})  # the node is lost after this row reached only its disk

    # The next attempt on another node: the store's view, the checkpoint verified, row 4 never seen.
    b = TrialDir(tmp_path / "node2" / NAME)
    done = pull_trial(store, NAME, b.path)
    assert done["big"] == ["checkpoints/ckpt_0000003.pt"]
    assert b.checkpoint(3).read_bytes() == a.checkpoint(3).read_bytes()
    assert _rows(b.path / "metrics.jsonl") == [1, 2, 3]
    b.keep_metrics(lambda step, row: step <= 3)  # what the trainer does on resume: a new generation
    b.append_metrics(4, {"train/loss": 0.3})
    b.add_row(ATTEMPTS, {"attempt": 2, "start_iter": 3})
    second = TrialSync(store, b, attempt=2)
    second.push()
    first.push()  # a zombie: the first attempt still writes, under its own stream only

    files, chunks = newest_view(store.list(f"trials/{NAME}"), f"trials/{NAME}")
    assert second.stream in chunks[0] and all(second.stream in k for k in files.values())
    assert first.stream < second.stream
    c = TrialDir(tmp_path / "node3" / NAME)
    pull_trial(store, NAME, c.path)
    assert [r["attempt"] for r in c.rows(ATTEMPTS)] == [1, 2]
    rows = c.metric_rows()
    assert [s for s, _ in rows] == [1, 2, 3, 4] and rows[-1][1]["train/loss"] == 0.3


def test_a_stream_whose_attempt_left_no_row_still_sorts_before_the_next(store, tmp_path):
    a = TrialDir(tmp_path / "a" / NAME).make()
    a.append_metrics(1, {"x": 1.0})
    TrialSync(store, a, attempt=1).push()  # died before its attempts row went up
    b = TrialDir(tmp_path / "b" / NAME)
    pull_trial(store, NAME, b.path)
    assert b.rows(ATTEMPTS) == []
    late = TrialSync(store, b, attempt=1)  # next_attempt() says 1 again: the stream number must not
    assert late.stream.split(".")[0] == "0002"


def test_scratch_is_never_ahead_and_pruning_reaches_the_store(store, tmp_path):
    a = TrialDir(tmp_path / "a" / NAME).make()
    for it in (3, 6):
        _write_ckpt(a, it)
    sync = TrialSync(store, a, attempt=1)
    sync.push()
    a.checkpoint(3).unlink()  # retention here ...
    _write_ckpt(a, 9)
    sync.push()
    keys = store.list(f"trials/{NAME}/checkpoints")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [
        "ckpt_0000006.pt", f"ckpt_0000006.pt{MANIFEST}", "ckpt_0000009.pt", f"ckpt_0000009.pt{MANIFEST}"]
    # A node's stale scratch: a checkpoint the store never committed goes, the committed ones come.
    b = TrialDir(tmp_path / "b" / NAME)
    _write_ckpt(b, 12)
    done = pull_trial(store, NAME, b.path)
    assert done["dropped"] == ["checkpoints/ckpt_0000012.pt"]
    assert [it for it, _ in b.checkpoints()] == [6, 9]
    # A view for a process that reads but does not train: manifests only, counted as checkpoints.
    v = TrialDir(tmp_path / "view" / NAME)
    pull_trial(store, NAME, v.path, checkpoints="manifests")
    assert v.checkpoints() == [] and v.committed_checkpoints() == [6, 9] and v.has_checkpoint(9)


def test_mirror_appends_chunks_and_rewrites_on_a_new_generation(store, tmp_path):
    a = TrialDir(tmp_path / "node" / NAME).make()
    sync = TrialSync(store, a, attempt=1)
    mirror = SweepMirror(store, tmp_path / "mirror")
    local = tmp_path / "mirror" / "trials" / NAME / "metrics.jsonl"
    a.append_metrics(1, {"x": 1.0})
    sync.push(final=True)
    mirror.pull_trials()
    inode = os.stat(local).st_ino
    a.append_metrics(2, {"x": 2.0})
    sync.push(final=True)
    mirror.pull_trials()
    assert _rows(local) == [1, 2] and os.stat(local).st_ino == inode  # appended: the tail reads on
    a.keep_metrics(lambda step, row: step <= 1)  # a resume's rewrite: a new generation, read anew
    a.append_metrics(2, {"x": 2.5})
    sync.push(final=True)
    mirror.pull_trials()
    assert _rows(local) == [1, 2] and os.stat(local).st_ino != inode
    assert json.loads(local.read_text().splitlines()[-1])["x"] == 2.5
    # The driver's own files go up and come back on another machine.
    (tmp_path / "mirror" / "sweep.json").write_text('{"name": "t"}')
    mirror.push_root()
    other = SweepMirror(store, tmp_path / "elsewhere")
    assert other.pull_root() == 1 and (tmp_path / "elsewhere" / "sweep.json").read_text() == '{"name": "t"}'


def test_the_mirror_lists_an_ended_task_until_its_stream_is_closed(store, tmp_path):
    a = TrialDir(tmp_path / "node" / NAME).make()
    sync = TrialSync(store, a, attempt=1)
    mirror = SweepMirror(store, tmp_path / "mirror")
    a.append_metrics(1, {"x": 1.0})
    a.write_final({"bbox/AP": 0.1})
    sync.push()  # the thread's pass: final_metrics.json goes, the last rows may not yet (METRICS_PUSH_S)
    mirror.pull_trials()
    assert f"trials/{NAME}" not in mirror.ended
    sync.close()  # the attempt's end: everything, then the stream's closing object
    mirror.pull_trials()
    assert f"trials/{NAME}" in mirror.ended
    assert [s for s, _ in TrialDir(tmp_path / "mirror" / "trials" / NAME).metric_rows()] == [1]
