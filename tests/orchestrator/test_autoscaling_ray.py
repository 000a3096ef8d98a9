"""The sweep on Ray's own fake autoscaler: a head without GPUs, a 2-GPU worker type, min 0, max 2.

A forked sweep at `gpus_per_trial: 2` (2 trunks + 4 branches) starts with no GPU node; its demand
(`ray.autoscaler.sdk.request_resources`, in queue order) gets nodes launched, each is storage-checked
as it joins, trials start on them, two gangs run at once on two launched nodes, the queue's order
holds, and when the sweep ends no placement group or resource request is left, so the idle nodes
go. The timeline (nodes, placement groups, request; gangs from the trials' gang.jsonl) is printed
as `autoscaling:` lines (pytest -s): the closing note of issue 24 quotes it.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.orchestrator.conftest import tiny_spec, write_spec
from tests.orchestrator.fake_autoscaler import HEAD_ID, Timeline, fake_cluster
from tests.orchestrator.sweep_utils import check_children, duplicate_points, mlflow_contents, start_driver
from tests.orchestrator.test_gangs_ray import EVALS, GRID, _gang_rows, _intervals, _peak, _release_groups

pytestmark = pytest.mark.slow

GPU2 = {"gpu2": {"resources": {"CPU": 2, "GPU": 2}, "max_workers": 2}}


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    with fake_cluster(tmp_path_factory.mktemp("fake"), GPU2, head_cpus=1, max_workers=2) as address:
        yield address


def _gangs_on(rows: dict[str, list[dict]]) -> list[tuple[float, float, str, str]]:
    """(start, end, trial, nodes) of every gang attempt, nodes as the fake ids' last digits."""
    out = []
    for start, end, name, attempt in _intervals(rows):
        nodes = sorted({r["node_id"] for r in rows[name] if r.get("attempt") == attempt and "rank" in r})
        out.append((start, end, name, "+".join(n[-5:] for n in nodes)))
    return out


def test_sweep_grows_from_no_gpu_node_and_lets_the_nodes_go(tmp_path, autoscaling_cluster):
    address = autoscaling_cluster
    spec = tiny_spec(tmp_path, name="auto", grid=GRID, fork_schedules=True,
                     resources={"cpus_per_trial": 1, "gpus_per_trial": 2}, base__optim__batch_size=2,
                     base__runtime__log_period=1)
    log = tmp_path / "driver.log"
    with Timeline(address) as timeline:
        assert timeline.rows[0][1] == ()  # no GPU node when the sweep starts
        driver = start_driver(["run", str(write_spec(tmp_path, spec)), "--no-view"], log,
                              env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"})
        try:
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
    released = re.findall(r"(\d\d:\d\d:\d\d) \S+ orchestrator.fork: queue: (\S+) starts \(critical path (\d+)\)", text)
    started = [n for _, _, n, a in _intervals(rows) if a == 1]
    assert _release_groups(released, started) == _release_groups(released, [n for _, n, _ in released]), \
        (released, gangs)
    # After the sweep: every placement group removed, no resource request, and the nodes went.
    last = timeline.rows[-1]
    assert all(state == "REMOVED" for state, _ in last[2]) and last[3] == 0, timeline.render()
    assert last[1] == (), timeline.render()
    check_children(mlflow_contents(tmp_path, "auto"), EVALS)
    assert duplicate_points(tmp_path) == []
    launched = sorted({n for row in timeline.rows for n in row[1]})
    print(f"autoscaling: sweep of 6 tasks in {ended - t0:.0f}s; GPU nodes launched {launched}; peak 2 gangs at "
          f"once; queue order {[n for _, n, _ in released]}")
    print("autoscaling: gangs " + "; ".join(f"{n} on {nodes} {s - t0:.0f}-{e - t0:.0f}s" for s, e, n, nodes in gangs))
    print("autoscaling: cluster timeline\n" + timeline.render())
