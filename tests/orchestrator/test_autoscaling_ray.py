"""The sweep on Ray's own fake autoscaler: a head without GPUs, a 2-GPU worker type, min 0, max 2.

A forked sweep at `gpus_per_trial: 2` (2 trunks + 4 branches) starts with no GPU node; its demand
(`ray.autoscaler.sdk.request_resources`, in queue order) gets nodes launched, each is storage-checked
as it joins, trials start on them, two gangs run at once on two launched nodes, the queue's order
holds, and when the sweep ends no placement group or resource request is left, so the idle nodes
go. In that same sweep (one cluster start), with `retry.max_failures: 0`, the trunk of the `all` cell
gets a preemption notice mid-trial (SIGTERM to its trial process, which passes it to both ranks): it
stops at the iteration it reached with that checkpoint, resumes on a launched node, is not counted
as a failure, and its branches end exactly as the trainer alone ends uninterrupted. The timeline (nodes, placement groups, request; gangs from the trials' gang.jsonl) is printed
as `autoscaling:` lines (pytest -s): the closing note of issue 24 quotes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests.orchestrator.conftest import tiny_spec, write_spec
from bench.harness.fake_autoscaler import HEAD_ID, Timeline, fake_cluster, node_pids
from tests.orchestrator.sweep_utils import (attempts, check_children, duplicate_points, mlflow_contents,
                                            start_driver, uninterrupted_run, wait_for)
from tests.orchestrator.test_gangs_ray import (EVALS, GRID, LOST, _checkpointed, _curve, _gang_rows, _intervals,
                                               _peak, _release_groups)
from tests.orchestrator.test_preemption_ray import _steps
from tests.plugins.faults import FAULTS

pytestmark = pytest.mark.slow

GPU2 = {"gpu2": {"resources": {"CPU": 2, "GPU": 2}, "max_workers": 2}}
GANG = {"cpus_per_trial": 1, "gpus_per_trial": 2}
TRUNK = "random-all-trunk-R18"  # trains 0..8 (LOST forks at 8); preempted with notice in the sweep test
REFERENCE: dict = {}  # LOST's uninterrupted run (trainer alone) and its curve in the first test's sweep


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    with fake_cluster(tmp_path_factory.mktemp("fake"), GPU2, head_cpus=1, max_workers=2) as cluster:
        yield cluster


def _gangs_on(rows: dict[str, list[dict]]) -> list[tuple[float, float, str, str]]:
    """(start, end, trial, nodes) of every gang attempt, nodes as the fake ids' last digits."""
    out = []
    for start, end, name, attempt in _intervals(rows):
        nodes = sorted({r["node_id"] for r in rows[name] if r.get("attempt") == attempt and "rank" in r})
        out.append((start, end, name, "+".join(n[-5:] for n in nodes)))
    return out


def test_sweep_grows_from_no_gpu_node_and_lets_the_nodes_go(tmp_path, autoscaling_cluster):
    address, _ = autoscaling_cluster
    spec = tiny_spec(tmp_path, name="auto", grid=GRID, fork_schedules=True, resources=GANG,
                     retry={"max_failures": 0}, base__optim__batch_size=2, base__runtime__log_period=1)
    log, sweep = tmp_path / "driver.log", tmp_path / "runs" / "auto"
    with Timeline(address) as timeline:
        assert timeline.rows[0][1] == ()  # no GPU node when the sweep starts
        driver = start_driver(["run", str(write_spec(tmp_path, spec)), "--no-view"], log,
                              env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", **FAULTS,
                                   "ORCHESTRATOR_DELAY": f"{TRUNK}@0.5"})
        try:
            notice = _notice_mid_trial(driver, sweep / "trials" / TRUNK, log)
            assert driver.wait(timeout=1200) == 0, log.read_text()[-4000:]
        finally:
            driver.kill()
        ended = time.time()
        deadline = ended + 120  # idle_timeout_minutes 0.1: the launched nodes go once nothing is asked
        while timeline.rows[-1][1] and time.time() < deadline:
            time.sleep(1)
    text = log.read_text()
    assert "autoscaler: gpu2 (max 2: 2 CPU, 2 GPU)" in text
    assert "running 6 trials, at most 2 at a time once the autoscaler launched the nodes" in text
    assert re.search(r"node\(s\) joined, shared storage checked", text), text[-3000:]
    rows = _gang_rows(tmp_path / "runs" / "auto")
    gangs = _gangs_on(rows)
    t0 = timeline.t0
    # Two gangs at once, on two different launched nodes (never the head: it has no GPU).
    overlap = [(a, b) for i, a in enumerate(gangs) for b in gangs[i + 1:] if b[0] < a[1] and a[0] < b[1]]
    assert _peak(_intervals(rows)) == 2 and any(a[3] != b[3] for a, b in overlap), gangs
    assert all(HEAD_ID[-5:] not in g[3] for g in gangs), gangs
    # The queue's order holds (tasks released together may start in either order).
    released = re.findall(r"(\d\d:\d\d:\d\d) \S+ orchestrator.sweep.fork: queue: (\S+) starts \(critical path (\d+)\)", text)
    started = [n for _, _, n, a in _intervals(rows) if a == 1]
    assert _release_groups(released, started) == _release_groups(released, [n for _, n, _ in released]), \
        (released, gangs)
    # After the sweep: every placement group removed, no resource request, and the nodes went.
    last = timeline.rows[-1]
    assert all(state == "REMOVED" for state, _ in last[2]) and last[3] == 0, timeline.render()
    assert last[1] == (), timeline.render()
    check_children(mlflow_contents(tmp_path, "auto"), EVALS)  # every point once, none missing
    assert duplicate_points(tmp_path) == []
    lost = _check_notice(sweep, notice, rows[TRUNK])
    REFERENCE.update(final=json.dumps(uninterrupted_run(sweep / "trials" / LOST, tmp_path / "reference")["final"]),
                     curve=_curve(tmp_path, "auto", LOST))
    assert json.loads((sweep / "trials" / LOST / "final_metrics.json").read_text()) == json.loads(REFERENCE["final"])
    launched = sorted({n for row in timeline.rows for n in row[1]})
    print(f"autoscaling: sweep of 6 tasks in {ended - t0:.0f}s; GPU nodes launched {launched}; peak 2 gangs at "
          f"once; queue order {[n for _, n, _ in released]}")
    print(f"autoscaling: preemption with notice: {TRUNK}'s trial process SIGTERMed {notice['sent'] - t0:.0f}s in, "
          f"at iteration >= {notice['seen']}; stopped at {lost['at']} ({lost['took']:.1f} s after the signal), resumed "
          f"from {lost['from']} on {lost['nodes']}: {lost['lost']} iteration(s) lost; max_failures 0; its branch "
          f"{LOST} ends as the trainer alone does uninterrupted")
    print("autoscaling: gangs " + "; ".join(f"{n} on {nodes} {s - t0:.0f}-{e - t0:.0f}s" for s, e, n, nodes in gangs))
    print("autoscaling: cluster timeline\n" + timeline.render())


def _notice_mid_trial(driver, trial, log) -> dict:
    """Once the trial logged 3 steps, SIGTERM its trial process (Tune's actor: rank 0's bundle), as a
    platform does before reclaiming a node; returns the step it had reached and when."""
    wait_for(driver, lambda: len(_steps(trial)) >= 3, log)
    pid = [r for r in attempts(trial.parents[1], trial.name) if "pid" in r][-1]["pid"]
    seen, sent = max(_steps(trial)), time.time()
    os.kill(pid, signal.SIGTERM)
    return {"seen": seen, "sent": sent}


def _check_notice(sweep, notice: dict, gang_rows: list[dict]) -> dict:
    """The trunk stopped at the step it reached (at most one past), resumed from exactly there in the same
    MLflow run on a launched node, counted as a preemption, not a failure (max_failures 0)."""
    rows = attempts(sweep, TRUNK)
    cut, starts = [r for r in rows if "preempted_at" in r], [r for r in rows if "start_iter" in r]
    assert len(cut) == 1 and len(starts) == 2, rows
    at = cut[0]["preempted_at"]
    assert notice["seen"] <= at <= notice["seen"] + 1, (notice, cut)
    assert starts[1]["start_iter"] == at and starts[0]["run_id"] == starts[1]["run_id"], starts
    again = [r for r in gang_rows if "gang_start" in r and r["gang_start"] > notice["sent"]]
    assert len(again) == 1 and HEAD_ID not in again[0]["nodes"], gang_rows
    state = json.loads((sweep / "state.json").read_text())["trials"]
    row = next(r for r in state.values() if r["name"] == TRUNK)
    assert row["status"] == "FINISHED" and row.get("preemptions") == 1, row
    return {"at": at, "from": starts[1]["start_iter"], "lost": at - starts[1]["start_iter"],
            "took": cut[0]["time"] - notice["sent"], "nodes": "+".join(n[-5:] for n in again[0]["nodes"])}


def test_node_killed_without_notice_resumes_on_a_launched_node(tmp_path, autoscaling_cluster):
    """One 2-GPU trial (12 iterations, slowed to 0.5 s each); once it has a checkpoint, every process of
    its node is SIGKILLed (a spot node gone without notice). The gang restarts whole from the newest
    checkpoint on a node the autoscaler provides, into the same MLflow run, and ends as the uninterrupted
    run of the first test did."""

    address, sid = autoscaling_cluster
    spec = tiny_spec(tmp_path, name="lost", grid={**GRID, "data": ["all"], "schedule": ["2x"]}, resources=GANG,
                     base__optim__batch_size=2, base__runtime__log_period=1)
    sweep, log = tmp_path / "runs" / "lost", tmp_path / "driver.log"
    with Timeline(address) as timeline:
        driver = start_driver(["run", str(write_spec(tmp_path, spec)), "--no-view"], log,
                              env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", **FAULTS,
                                   "ORCHESTRATOR_DELAY": f"{LOST}@0.5"})
        try:
            wait_for(driver, lambda: _checkpointed(sweep, 3), log)
            first = _gang_rows(sweep)[LOST][0]
            (node,) = set(first["nodes"])
            newest = max(int(p.stem.split("_")[1]) for p in (sweep / "trials" / LOST / "checkpoints").glob("ckpt_*.pt"))
            killed_at = time.time()
            reached = _reached(sweep / "trials" / LOST / "metrics.jsonl")
            pids = node_pids(sid, node)
            assert pids, node
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            assert driver.wait(timeout=900) == 0, log.read_text()[-4000:]
        finally:
            driver.kill()
    rows = _gang_rows(sweep)[LOST]
    again = [r for r in rows if "gang_start" in r and r["gang_start"] > killed_at]
    assert len(again) == 1 and node not in again[0]["nodes"], rows
    tries = [json.loads(x) for x in (sweep / "trials" / LOST / "attempts.jsonl").read_text().splitlines()]
    tries = [a for a in tries if "start_iter" in a]
    assert tries[-1]["start_iter"] == newest or tries[-1]["start_iter"] >= 3, (newest, tries)
    assert len({a["run_id"] for a in tries}) == 1, tries
    check_children(mlflow_contents(tmp_path, "lost"), {LOST: EVALS[LOST]})
    assert duplicate_points(tmp_path) == []
    final = (sweep / "trials" / LOST / "final_metrics.json").read_text()
    if REFERENCE:
        assert json.loads(final) == json.loads(REFERENCE["final"])
        assert _curve(tmp_path, "lost", LOST) == REFERENCE["curve"]
    t0 = timeline.t0
    print(f"autoscaling: node {node[-5:]} killed at {killed_at - t0:.0f}s with the trial's newest checkpoint at "
          f"{newest}; the gang restarted on {'+'.join(n[-5:] for n in again[0]['nodes'])} from iteration "
          f"{tries[-1]['start_iter']}: {reached - tries[-1]['start_iter']} iteration(s) lost (it had logged "
          f"{reached}); "
          f"final equals the uninterrupted run: {bool(REFERENCE)}")
    print("autoscaling: cluster timeline (node killed)\n" + timeline.render())


def _reached(path) -> int:
    """The newest iteration a trial logged (metrics.jsonl rows: {"step": i, ...})."""
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return max(steps, default=0)
