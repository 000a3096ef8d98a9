"""A forked sweep on `storage_path: s3://...` (issue 25's acceptance): a local S3 server (moto's server
mode on 127.0.0.1, `bench.harness.s3_server`) and a real 2-node Ray cluster whose nodes share nothing
but the store.

Each node (`ray start --block`, head and worker) runs in its own mount namespace with an empty tmpfs
over the spec's `local_cache` folder, where the trials train (node-local scratch); the driver runs in the
test's own namespace, its mirror of the sweep in the same `local_cache` path on the host. The head
declares no CPU, so every trial trains on the worker node; a worker node SIGKILLed mid-trial is
replaced by a fresh one (an empty tmpfs again), where the trial can only resume from the store.
Nodes and drivers get the server's endpoint and credentials from the environment (os.environ, which
`start_node` and the drivers copy), as instance credentials on a cloud.

While the sweep runs, a poller lists the store every 0.5 s and checks every checkpoint that has a
manifest against it (size, sha256): a checkpoint object that does not match its manifest, or a
manifest without its object, would be a partial checkpoint visible to a resume. What the test
measured is printed as one `object storage:` line (pytest -s shows it).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest

from bench.harness.load_shape import logged_to_mlflow
from bench.harness.s3_server import client, exported, s3_server
from orchestrator.state.folder import DEFAULT_CACHE
from tests.plugins.faults import FAULTS
from tests.orchestrator.conftest import auth_disabled, cli, kill_node, start_node, stop_node, tiny_spec, write_spec
from tests.orchestrator.sweep_utils import (attempts, check_children, duplicate_points, kill_driver_when,
                                            mlflow_contents, start_driver, wait_for)
from trainer.trial_dir import parse_metric_rows

pytestmark = pytest.mark.slow

BUCKET, PREFIX, SWEEP = "sweeps", "team/issue25", "objs"
ROOT = f"{PREFIX}/{SWEEP}"  # the sweep's keys in the bucket
GRID = {"init": ["random"], "data": ["all"], "schedule": ["1x", "2x"], "backbone": ["R18"]}
# iters_per_x 6: the trunk trains to 8 (checkpoints at the fork points 2 and 8, and every 3); the 1x
# branch forks at 2 and ends at 6, the 2x branch forks at 8 and ends at 12; evaluations every 3.
TRUNK = "random-all-trunk-R18"
EVALS = {"random-all-1x-R18": [3, 6], "random-all-2x-R18": [3, 6, 9, 12]}
FORK_AT = {"random-all-1x-R18": 2, "random-all-2x-R18": 8}
MANIFEST = ".manifest.json"


@pytest.fixture
def cluster(tmp_path):
    """S3 server, and a head (no CPU) plus a worker node (2 CPUs), each node over its own empty tmpfs
    at tmp/cache; yields (env, address, node processes, cache, start a fresh worker)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    wrap = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs tmpfs "{cache}" && exec "$0" "$@"')
    nodes: list = []
    # `status s3://...` (and `resume s3://...`) mirror into the default local cache first: this test's
    # copy goes with the test (an older one would be another server's sweep under the same URI).
    shutil.rmtree(DEFAULT_CACHE / "mirror" / "s3" / BUCKET / ROOT, ignore_errors=True)
    with s3_server(BUCKET) as env, exported(env), auth_disabled():
        head, address = start_node(tmp_path / "head.log", num_cpus=0, prefix=wrap)
        nodes.append(head)

        def new_worker():
            nodes.append(start_node(tmp_path / f"worker{len(nodes)}.log", head=address, num_cpus=2, prefix=wrap)[0])
            return nodes[-1]

        try:
            new_worker()
            yield env, address, nodes, cache, new_worker
        finally:
            for proc in reversed(nodes):
                stop_node(proc)
            shutil.rmtree(DEFAULT_CACHE / "mirror" / "s3" / BUCKET / ROOT, ignore_errors=True)


class StorePoller(threading.Thread):
    """Lists the sweep's keys every 0.5 s; checks each committed checkpoint (one with a manifest) once per
    (object, manifest) version: its bytes match the manifest, and the manifest never stands alone."""

    def __init__(self, env: dict[str, str]):
        super().__init__(name="store-poller", daemon=True)
        self.s3, self.stop = client(env), threading.Event()
        self.checked: set[tuple[str, str, str]] = set()
        self.whole: set[tuple[str, str]] = set()  # (key, etag) of objects without a manifest checked whole
        self.problems: list[str] = []
        self.scans = 0

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.scan()
            except Exception as exc:  # a failed scan is a finding too (the server is in this process)
                self.problems.append(f"scan failed: {type(exc).__name__}: {exc}")

    def listing(self) -> dict[str, tuple[int, str]]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=ROOT + "/"):
            out.update({o["Key"]: (o["Size"], o["ETag"]) for o in page.get("Contents", [])})
        return out

    def scan(self, again: bool = False) -> None:
        found = self.listing()
        self.scans += 1
        for key, (_, etag) in found.items():
            if key.endswith(".pt") and "/.uploads/" not in key and key + MANIFEST not in found \
                    and (key, etag) not in self.whole:
                problem = self.whole_zip(key)  # not committed yet: still never a partial object
                if problem:
                    self.problems.append(problem)
                self.whole.add((key, etag))
            if not key.endswith(".pt" + MANIFEST):
                continue
            data = key[:-len(MANIFEST)]
            version = (data, etag, found.get(data, (0, ""))[1])
            if again or version not in self.checked:
                problem = self.verify(data)
                if problem:
                    self.problems.append(problem)
                self.checked.add(version)

    def _get(self, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def whole_zip(self, key: str) -> str | None:
        """An object under a checkpoint's final name is a whole torch file (a zip with its central
        directory and every member's CRC right), committed or not."""
        body = self._get(key)
        if body is None:
            return None  # pruned since the listing
        try:
            with zipfile.ZipFile(io.BytesIO(body)) as z:
                bad = z.testzip()
        except zipfile.BadZipFile as exc:
            return f"{key}: a partial checkpoint object ({len(body)} bytes: {exc})"
        return f"{key}: member {bad} damaged" if bad else None

    def verify(self, data_key: str) -> str | None:
        manifest = self._get(data_key + MANIFEST)
        if manifest is None:
            return None  # deleted since the listing (retention deletes the manifest first)
        body = self._get(data_key)
        if body is None:
            if self._get(data_key + MANIFEST) is None:
                return None  # its deletion went on meanwhile
            return f"{data_key}: a manifest without its object"
        want = json.loads(manifest)
        got = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        if got != {k: want.get(k) for k in got}:
            if self._get(data_key + MANIFEST) != manifest:
                return None  # committed again meanwhile (the new version is checked at the next scan)
            return f"{data_key}: object {got} does not match its manifest {want}"
        return None


def _manifests(poller: StorePoller, name: str) -> list[int]:
    """Iterations of the trial's committed checkpoints in the store now."""
    head = f"{ROOT}/trials/{name}/checkpoints/ckpt_"
    return sorted(int(k[len(head):].split(".")[0]) for k in poller.listing()
                  if k.startswith(head) and k.endswith(".pt" + MANIFEST))


def _streams(poller: StorePoller, name: str) -> set[str]:
    head = f"{ROOT}/trials/{name}/streams/"
    return {k[len(head):].split("/")[0] for k in poller.listing() if k.startswith(head)}


def _stored_rows(poller: StorePoller, name: str) -> list[tuple[int, dict]]:
    """A trial's metric rows straight from the store: its newest stream's newest generation of chunks."""
    head = f"{ROOT}/trials/{name}/streams/"
    chunks = sorted(k[len(head):] for k in poller.listing() if k.startswith(head) and "/metrics/" in k)
    if not chunks:
        return []
    newest = max(c.split("/")[0] for c in chunks)
    chunks = [c for c in chunks if c.startswith(newest + "/")]
    gen = max(c.split("/")[-1].split("-")[0] for c in chunks)
    data = b"".join(poller._get(head + c) for c in chunks if c.split("/")[-1].startswith(gen + "-"))
    return parse_metric_rows(data)


def _expected_points(poller: StorePoller) -> dict[str, set[tuple[str, int]]]:
    """(key, step) each trial's MLflow run must hold: its trunk's rows up to its fork point, then its own."""
    trunk = _stored_rows(poller, TRUNK)
    out = {}
    for name, at in FORK_AT.items():
        rows = [(s, r) for s, r in trunk if s <= at] + [(s, r) for s, r in _stored_rows(poller, name) if s > at]
        out[name] = {(k, s) for s, r in rows for k, v in r.items() if logged_to_mlflow(k, v)}
    return out


def _mlflow_points(ml: dict) -> dict[str, set[tuple[str, int]]]:
    return {name: {(k, s) for k, steps in hist.items() for s in steps} for name, hist in ml["history"].items()}


def _check_mlflow(tmp: Path, poller: StorePoller) -> int:
    """Complete curves, no duplicate point, and exactly the stored chunks' points; returns how many."""
    ml = mlflow_contents(tmp, SWEEP)
    check_children(ml, EVALS)
    assert duplicate_points(tmp) == []
    stored, logged = _expected_points(poller), _mlflow_points(ml)
    for name in EVALS:
        assert logged[name] == stored[name], (name, sorted(stored[name] - logged[name])[:10],
                                              sorted(logged[name] - stored[name])[:10])
    return sum(map(len, logged.values()))


def _check_kept(poller: StorePoller) -> list[int]:
    """keep_checkpoints: final (the default): each trial's last checkpoint stays, committed; the trunk's
    fork points went once both branches had their own. Returns the sizes of the checkpoint objects left."""
    listing = poller.listing()
    kept = sorted(k[len(ROOT) + 1:-len(MANIFEST)] for k in listing if k.endswith(".pt" + MANIFEST))
    assert kept == [f"trials/{n}/checkpoints/ckpt_{e[-1]:07d}.pt" for n, e in sorted(EVALS.items())], kept
    return [size for k, (size, _) in listing.items() if k.endswith(".pt")]


def _spec(tmp: Path, cache: Path) -> Path:
    spec = tiny_spec(tmp, name=SWEEP, grid=GRID, fork_schedules=True, base__runtime__log_period=1,
                     storage_path=f"s3://{BUCKET}/{PREFIX}", local_cache=str(cache))
    return write_spec(tmp, spec)


def _lose_worker(state: dict, poller: StorePoller, nodes: list, new_worker) -> None:
    """SIGKILL the worker node (every trial trains there), then a fresh one joins (an empty tmpfs)."""
    state.update(newest=_manifests(poller, TRUNK), streams=_streams(poller, TRUNK), lost_at=time.time())
    kill_node(nodes[-1])
    new_worker()
    state["joined"] = time.time() - state["lost_at"]


@pytest.mark.timeout(900)
def test_forked_sweep_on_object_storage(tmp_path, cluster):
    env, address, nodes, cache, new_worker = cluster
    uri = f"s3://{BUCKET}/{ROOT}"
    path, mirror = _spec(tmp_path, cache), cache / "mirror" / "s3" / BUCKET / ROOT
    # A delay (test hook) holds the trunk's window between its first committed checkpoint and its end open:
    # an upload of one of its ~100 MB checkpoints takes 2-9 s on a loaded 2-core machine, and the store
    # lags training by that much.
    denv = {"RAY_ADDRESS": address, **FAULTS, "ORCHESTRATOR_DELAY": f"{TRUNK}@3"}
    poller = StorePoller(env)
    poller.start()
    t0 = time.time()
    state: dict = {}

    def ready() -> bool:
        """First the worker node is lost with the trunk mid-way (past a committed checkpoint, its last
        iteration's row not in the store yet) and a fresh worker node joins; then the driver is killed,
        once the trunk trained again on the new node."""
        if "lost_at" not in state:
            committed, rows = _manifests(poller, TRUNK), _stored_rows(poller, TRUNK)
            if not committed or not 3 <= committed[-1] < 8 or not rows or rows[-1][0] >= 8:
                return False
            _lose_worker(state, poller, nodes, new_worker)
            return False
        # A checkpoint newer than the loss committed (only an attempt on the new node could have), or
        # none left: the trunk finished there and its checkpoints were pruned.
        committed = _manifests(poller, TRUNK)
        return bool(_streams(poller, TRUNK) - state["streams"]) and (not committed
                                                                     or committed[-1] > state["newest"][-1])

    try:
        killed_at = kill_driver_when(["run", str(path), "--no-view"], ready, tmp_path / "driver1.log", denv,
                                     timeout=600)
        t_resume = time.time()
        out = cli("resume", uri, "--no-view", env=denv, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        wall = time.time() - t0
    finally:
        poller.stop.set()
        poller.join()
    problems_live = list(poller.problems)
    poller.scan(again=True)  # at the end: every manifest matches its object
    assert poller.problems == [] and problems_live == [], poller.problems
    assert poller.scans >= 20, poller.scans

    # The trunk resumed on the fresh node from its newest committed checkpoint at the loss, or later.
    tries = [a for a in attempts(mirror, TRUNK) if "start_iter" in a]
    after = [a for a in tries if a["time"] > state["lost_at"]]
    assert after and after[0]["start_iter"] >= state["newest"][-1] >= 3, (state, tries)

    points = _check_mlflow(tmp_path, poller)
    status = cli("status", uri, timeout=300)
    assert status.returncode == 0 and "total: 2 trials + 1 trunks (3 finished)" in status.stdout, \
        status.stdout + status.stderr
    report = cli("report", str(mirror), "--no-log", timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    sizes = _check_kept(poller)
    cost = [a for n in (TRUNK, *EVALS) for a in attempts(mirror, n) if "uploads" in a]  # attempts that ended
    uploads, upload_mb, upload_s = (sum(a[k] for a in cost) for k in ("uploads", "upload_mb", "upload_s"))
    print(f"object storage: sweep {wall:.0f}s (resume {time.time() - t_resume:.0f}s of it, after the kill at "
          f"{killed_at - t0:.0f}s); worker node lost with the trunk's newest committed checkpoint at "
          f"{state['newest'][-1]}, a fresh node joined in {state['joined']:.0f}s, the trunk resumed from "
          f"{after[0]['start_iter']}; driver SIGKILLed, resume rc 0; {poller.scans} store scans, "
          f"{len(poller.checked)} committed checkpoint versions checked, 0 mismatches, {len(poller.whole)} "
          f"uncommitted ones whole; MLflow points "
          f"{points} = stored, duplicates 0; checkpoint objects left {len(sizes)} "
          f"({sum(sizes) / 1e6:.1f} MB); checkpoint uploads recorded {uploads}, {upload_mb:.0f} MB in "
          f"{upload_s:.1f} s ({upload_s / max(uploads, 1):.1f} s each)")


@pytest.mark.timeout(900)
def test_worker_node_lost_while_a_finished_trunk_uploads(tmp_path, cluster):
    """The trunk has finished on its node and the store shows its done marker, but its last fork
    checkpoint (iteration 8, where the 2x branch starts) is not committed yet: the node is lost then.
    The sweep must still finish (the trunk trains again from what the store has). If the store never
    shows that state (the marker goes up only after the checkpoints), there is nothing to lose."""
    env, address, nodes, cache, new_worker = cluster
    path, log = _spec(tmp_path, cache), tmp_path / "driver.log"
    poller = StorePoller(env)
    done = "/files/trunk_done.json"  # the trunk's done marker, in one of its streams
    fork8 = f"{ROOT}/trials/{TRUNK}/checkpoints/ckpt_0000008.pt{MANIFEST}"
    state: dict = {}

    def window() -> bool:
        """True once the window is open (the marker without the checkpoint) or can no longer open."""
        keys = poller.listing()
        marked = any(k.startswith(f"{ROOT}/trials/{TRUNK}/streams/") and k.endswith(done) for k in keys)
        state["open"] = marked and fork8 not in keys
        return state["open"] or fork8 in keys

    poller.start()
    driver = start_driver(["run", str(path), "--no-view"], log, {"RAY_ADDRESS": address})
    try:
        wait_for(driver, window, log, timeout=600, poll=0.1)
        if state["open"]:
            _lose_worker(state, poller, nodes, new_worker)
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        poller.stop.set()
        poller.join()
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert poller.problems == [], poller.problems
    check_children(mlflow_contents(tmp_path, SWEEP), EVALS)
    assert duplicate_points(tmp_path) == []
    print(f"object storage: trunk done marker in the store before its fork checkpoint 8: "
          f"{'yes, worker node lost then (committed: ' + str(state['newest']) + ')' if state['open'] else 'never'}"
          f"; the sweep finished, duplicates 0")


@pytest.mark.timeout(600)
def test_ddp_gang_on_one_node_on_object_storage(tmp_path, cluster):
    """A 2-rank gang (gloo) with `one_node: true`: its trial's process pulls and pushes the scratch folder
    its ranks train in on their one node; the run's curve in MLflow is the store's, once each."""
    env, address, _, cache, _ = cluster
    spec = tiny_spec(tmp_path, name=SWEEP, grid={**GRID, "schedule": ["1x"]}, base__runtime__log_period=1,
                     resources={"cpus_per_trial": 1.98, "workers_per_trial": 2, "one_node": True},
                     base__optim__batch_size=2, storage_path=f"s3://{BUCKET}/{PREFIX}", local_cache=str(cache))
    out = cli("run", str(write_spec(tmp_path, spec)), "--no-view", env={"RAY_ADDRESS": address}, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    name = "random-all-1x-R18"
    ml = mlflow_contents(tmp_path, SWEEP)
    check_children(ml, {name: [3, 6]})
    assert duplicate_points(tmp_path) == []
    poller = StorePoller(env)
    stored = {(k, s) for s, r in _stored_rows(poller, name) for k, v in r.items() if logged_to_mlflow(k, v)}
    assert _mlflow_points(ml)[name] == stored and stored
    rank0 = attempts(cache / "mirror" / "s3" / BUCKET / ROOT, name)[0]
    print(f"object storage: 2-rank gang on one node trained {name}; MLflow points {len(stored)} = stored, "
          f"duplicates 0; attempt on node {rank0.get('node_id', '?')[:12]}")
