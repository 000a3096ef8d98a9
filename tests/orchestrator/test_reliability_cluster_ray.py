"""Reliability when the cluster itself fails: a worker node lost mid-trial, and the whole cluster stopped.

Each test owns its cluster of `ray start --block` processes, one per node, each in its own process
group, torn down by the test: a head, and for the lost node two worker nodes with one logical GPU
each (the head has none), so the trial is placed by its GPU; the storage path is shared by being on
one local disk. A node is lost by SIGKILLing its process group (raylet, object store, its workers).
What each test injects and what it counts is printed as one `reliability:` line (pytest -s shows it).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.plugins.faults import FAULTS
from tests.orchestrator.conftest import auth_disabled, cli, kill_node, start_node, stop_node, tiny_spec, write_spec
from tests.orchestrator.sweep_utils import (attempts, check_children, duplicate_points, mlflow_contents, progress,
                                            start_driver, wait_for, wait_unlocked)

pytestmark = pytest.mark.slow

NAME = "random-all-2x-R18"
GRID = {"init": ["random"], "data": ["all"], "schedule": ["2x"], "backbone": ["R18"]}
EVALS = [3, 6, 9, 12]


@pytest.fixture
def gpu_cluster(tmp_path):
    """A head (1 CPU, no GPU) and two worker nodes (1 CPU, 1 logical GPU each); (address, workers)."""
    with auth_disabled():
        head, address = start_node(tmp_path / "head.log", num_cpus=1, num_gpus=0)
        workers = []
        try:
            for i in range(2):
                workers.append(start_node(tmp_path / f"worker{i}.log", head=address, num_cpus=1, num_gpus=1)[0])
            yield address, workers
        finally:
            for proc in workers:
                stop_node(proc)
            stop_node(head)


def _node_of(pid: int, nodes: list) -> object:
    """The `ray start` process (node) whose process tree holds `pid`."""
    by_pid = {n.pid: n for n in nodes}
    while pid > 1:
        if pid in by_pid:
            return by_pid[pid]
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # ppid
    raise AssertionError("the trial runs on none of the worker nodes")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited (whoever adopted it may not have reaped it yet)


def _mid_trial(sweep) -> bool:
    done, ckpt = progress(sweep, NAME)
    return not done and ckpt >= 3


@pytest.mark.timeout(900)
def test_lost_worker_node_trial_resumes_on_another(tmp_path, gpu_cluster):
    address, workers = gpu_cluster
    spec = tiny_spec(tmp_path, grid=GRID, base__runtime__log_period=1,
                     resources={"cpus_per_trial": 1, "gpus_per_trial": 1})
    sweep, log = tmp_path / "runs" / "tiny", tmp_path / "driver.log"
    # A delay (test hook) holds the window between the trial's first checkpoint and its end open.
    driver = start_driver(["run", str(write_spec(tmp_path, spec)), "--no-view"], log,
                          {"RAY_ADDRESS": address, **FAULTS, "ORCHESTRATOR_DELAY": f"{NAME}@0.5"})
    try:
        wait_for(driver, lambda: _mid_trial(sweep), log)
        first = attempts(sweep, NAME)[0]
        lost = _node_of(first["pid"], workers)  # placed by its GPU: on a worker node, never the head
        assert first["gpu_ids"], first
        removed_at, ckpt_at_removal = time.time(), progress(sweep, NAME)[1]
        kill_node(lost)
        deadline = time.time() + 60
        while _alive(first["pid"]):  # the node's processes die with it, the trial's included
            assert time.time() < deadline, f"trial process {first['pid']} outlived its node"
            time.sleep(0.5)
        assert driver.wait(timeout=480) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    tries = [a for a in attempts(sweep, NAME) if "start_iter" in a]
    again = [a for a in tries if a["time"] > removed_at]
    assert len(again) == 1 and again[0]["start_iter"] >= 3, tries
    assert again[0]["node_id"] != first["node_id"] and again[0]["gpu_ids"], again
    ml = mlflow_contents(tmp_path, "tiny")
    check_children(ml, {NAME: EVALS})
    # One run per trial (check_children); an attempt names it, or none when launched before the driver made it.
    assert {a["run_id"] for a in tries} - {""} <= {ml["children"][NAME].info.run_id}
    assert duplicate_points(tmp_path) == []
    # A logical GPU from Ray does not pull a `runtime.device: cpu` trial onto CUDA.
    segments = (sweep / "trials" / NAME / "segments.jsonl").read_text()
    assert '"cuda": true' not in segments and '"cuda": false' in segments
    # The killed attempt's work counts (it wrote no segments.jsonl row): at least the plan was trained.
    terminal = log.read_text()
    trained, plan = map(int, re.search(r"(\d+) iterations trained \(plan: (\d+)\)", terminal).groups())
    assert trained >= plan, terminal[-2000:]
    # Ray's traceback of the lost node: one line in the terminal, the full text in the sweep's log.
    assert "Traceback" not in terminal, terminal[-3000:]
    assert "Traceback" in (sweep / "driver.log").read_text()
    rows = sum(len(v) for v in ml["history"][NAME].values())
    print(f"reliability: SIGKILLed worker node {first['node_id'][:8]} mid-trial (newest checkpoint "
          f"{ckpt_at_removal}); trial resumed on node {again[0]['node_id'][:8]} from iteration "
          f"{again[0]['start_iter']}; finished trials {int(progress(sweep, NAME)[0])}/1; runs {ml['total']}; "
          f"metric rows {rows}; duplicates 0")


@pytest.mark.timeout(900)
def test_whole_cluster_stopped_mid_sweep_then_started_again(tmp_path):
    path = write_spec(tmp_path, tiny_spec(tmp_path, grid=GRID, base__runtime__log_period=1))
    sweep, log = tmp_path / "runs" / "tiny", tmp_path / "driver1.log"
    with auth_disabled():
        head, address = start_node(tmp_path / "head1.log")
        driver = None
        try:
            driver = start_driver(["run", str(path), "--no-view"], log,
                                  {"RAY_ADDRESS": address, **FAULTS, "ORCHESTRATOR_DELAY": f"{NAME}@0.5"})
            wait_for(driver, lambda: _mid_trial(sweep), log)
            stopped_at = time.time()
            # Every process of the (one-node) cluster at once: head, GCS, raylet, workers. (A SIGTERM
            # would let the node drain its running trial for up to 30 s first.)
            kill_node(head)
            try:  # a driver that lost its cluster ends; one that hangs is killed, as if on the lost head
                driver_rc = driver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                driver_rc = None
        finally:
            if head.poll() is None:
                stop_node(head)
            if driver is not None and driver.poll() is None:
                driver.kill()
                driver.wait()
        wait_unlocked(sweep / "trials" / NAME)
        stopped_iter = progress(sweep, NAME)[1]
        head, address = start_node(tmp_path / "head2.log")
        try:
            out = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": address})
        finally:
            stop_node(head)
    assert out.returncode == 0, out.stderr[-3000:]
    tries = [a for a in attempts(sweep, NAME) if "start_iter" in a]
    again = [a for a in tries if a["time"] > stopped_at]
    assert len(again) == 1 and again[0]["start_iter"] == stopped_iter >= 3, tries
    ml = mlflow_contents(tmp_path, "tiny")
    check_children(ml, {NAME: EVALS})
    # One run per trial (check_children); an attempt names it, or none when launched before the driver made it.
    assert {a["run_id"] for a in tries} - {""} <= {ml["children"][NAME].info.run_id}
    assert duplicate_points(tmp_path) == []
    rows = sum(len(v) for v in ml["history"][NAME].values())
    print(f"reliability: stopped the whole cluster with the trial past checkpoint {stopped_iter} (driver "
          f"{'exited ' + str(driver_rc) if driver_rc is not None else 'hung, killed'}); new cluster, `run` "
          f"resumed it from iteration {again[0]['start_iter']}; finished trials {int(progress(sweep, NAME)[0])}/1; "
          f"runs {ml['total']}; metric rows {rows}; duplicates 0")
