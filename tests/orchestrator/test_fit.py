"""The fit count `run`, the live queue and `plan --gpus --node` share, free resources, and the nodes an
autoscaler could launch (no cluster: nodes are plain dicts; the live count reads a stand-in cluster)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import orchestrator.execution.autoscale as autoscale
from orchestrator.execution.capacity import Capacity, most_at_once
from orchestrator.errors import ClusterError, SpecError
from orchestrator.sweep.expand import expand
from orchestrator.sweep.fit import NodeType, autoscaler_nodes, trials_at_once
from orchestrator.sweep.plan import makespan_bound, render_makespan
from orchestrator.sweep.spec import Resources, load_spec
from tests.orchestrator.conftest import REPO, tiny_spec, write_spec

FULL = {"gpus_per_trial": 2, "cpus_per_trial": 4}  # the workers fill a 4-CPU node: the trial's own 0.01 does not fit
NODE = {"CPU": 4.0, "GPU": 2.0}


def test_plan_gpus_agrees_with_run_when_the_trial_fills_a_node(tmp_path):
    exp = expand(load_spec(write_spec(tmp_path, tiny_spec(tmp_path, resources=FULL, base__runtime__device="cpu"))))
    res = Resources(**FULL)
    for nodes in (2, 3, 4):
        cluster = [dict(NODE) for _ in range(nodes)]
        run_count = most_at_once(res, None, cluster)  # what `run` starts with
        assert makespan_bound(exp, 2 * nodes, (2, 4)).slots == run_count == nodes - 1
        assert makespan_bound(exp, 2 * nodes).slots == nodes  # GPUs alone: one trial too many
    with pytest.raises(ClusterError, match="cannot hold one trial"):
        most_at_once(res, None, [dict(NODE)])
    with pytest.raises(SpecError, match=r"--gpus 2: a cluster of 2 GPUs \(1 nodes of 2 GPUs, 4 CPUs\) cannot hold"):
        render_makespan(exp, 2, (2, 4))
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", str(tmp_path / "spec.yaml"), "--gpus", "6",
                          "--node", "2,4"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cluster of 6 GPUs (3 nodes of 2 GPUs, 4 CPUs): at most 2 trial(s) at a time" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "orchestrator", "plan", str(tmp_path / "spec.yaml"), "--gpus", "5",
                          "--node", "2,4"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--gpus 5 is not a whole number of 2-GPU nodes" in bad.stderr


def test_the_nodes_an_autoscaler_could_launch():
    gpu = NodeType("gpu2", {"CPU": 2.0, "GPU": 2.0}, 2)
    cpu = NodeType("cpu8", {"CPU": 8.0}, 3)
    assert autoscaler_nodes([gpu], {}, None) == [gpu.resources] * 2
    assert autoscaler_nodes([gpu], {"gpu2": 1}, None) == [gpu.resources]
    assert autoscaler_nodes([cpu, gpu], {}, 4) == [cpu.resources] * 3 + [gpu.resources]  # the cluster's cap
    head = {"CPU": 1.0}
    auto = autoscale.Autoscaler((gpu,), 2)
    res = Resources(gpus_per_trial=2)
    assert most_at_once(res, auto, [head]) == 2  # no GPU node yet: the two the autoscaler may launch
    assert most_at_once(res, auto, [head, dict(gpu.resources)]) == 2  # one is up, one more may come
    with pytest.raises(ClusterError, match="every node its autoscaler may launch.*add node types"):
        most_at_once(Resources(gpus_per_trial=4, one_node=True), auto, [head])


class _Cluster:
    """A stand-in for the two cluster reads the live count makes (alive nodes, free resources)."""

    def __init__(self, monkeypatch, total: dict[str, dict], free: dict[str, dict]):
        self.total, self.free = total, free
        monkeypatch.setattr("orchestrator.execution.ray_backend.alive_nodes", lambda: dict(self.total))
        monkeypatch.setattr(autoscale, "free_resources", lambda: dict(self.free))
        monkeypatch.setattr("orchestrator.execution.capacity.LIMIT_TTL_S", 0.0)


def test_the_queue_counts_free_resources_and_checks_nodes_that_join(monkeypatch):
    res = Resources(gpus_per_trial=2, cpus_per_trial=2)
    node = {"CPU": 3.0, "GPU": 2.0}
    # Node b's GPUs are held by another job: only a's gang is free (a's may hold this sweep's own gang).
    cluster = _Cluster(monkeypatch, {"a": node, "b": node}, {"a": node, "b": {"CPU": 3.0, "GPU": 0.0}})
    checks: list[list[str]] = []

    def check(nodes):
        checks.append(sorted(nodes))
        return {"d": ("host-d", ["the dataset root /data"])} if "d" in nodes else {}

    cap = Capacity(res, {"a", "b"}, check)
    assert cap.limit() == 1
    cluster.total.update(c=node, d=node)  # two nodes join; d does not see the dataset
    cluster.free.update(c=node, d=node)
    assert cap.limit() == 2 and checks == [["c", "d"]]
    assert cap.refused == {"d"} and "c" in cap.checked
    del cluster.total["c"], cluster.free["c"]  # c leaves
    assert cap.limit() == 1 and checks == [["c", "d"]]  # nobody checked twice


def test_free_resources_count_this_jobs_groups_as_its_own(tmp_path, ray_cluster):
    """On a real 2-CPU node: another job's task holds a CPU, this job's placement group holds one."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from tests.orchestrator.conftest import auth_disabled

    with auth_disabled():
        ray.init(address=ray_cluster, log_to_driver=False, configure_logging=False)
        try:
            group = placement_group([{"CPU": 1.0}])
            ray.get(group.ready(), timeout=60)
            (free,) = autoscale.free_resources().values()
            assert free["CPU"] == 2.0  # this job's group is its own to give
            remove_placement_group(group)
            blocker = ray.remote(num_cpus=1)(_hold).remote()  # as another job would: not free
            for _ in range(50):
                (free,) = autoscale.free_resources().values()
                if free["CPU"] == 1.0:
                    break
                time.sleep(0.2)
            assert free["CPU"] == 1.0
            ray.cancel(blocker, force=True)
        finally:
            ray.shutdown()


def _hold() -> None:
    time.sleep(60)


def test_demand_asks_for_the_waiting_gangs_and_drops_when_none_wait(monkeypatch):
    asked: list[list[dict]] = []
    monkeypatch.setattr(autoscale, "request", lambda bundles: asked.append(bundles))
    res = Resources(gpus_per_trial=2, cpus_per_trial=1)
    cap = Capacity(res, set(), None, auto=autoscale.Autoscaler((NodeType("g", {"CPU": 2.0, "GPU": 2.0}, 2),), 2),
                   most=2)
    cap.demand(running=0, waiting=5)
    assert len(asked) == 1 and sum(b.get("GPU", 0) for b in asked[0]) == 4  # capped at what the types hold
    cap.demand(running=1, waiting=4)
    assert len(asked) == 1  # the same two gangs: no new request
    cap.demand(running=2, waiting=0)
    cap.close()
    assert asked[1:] == [[], []]
    assert trials_at_once(res, [{"CPU": 2.0, "GPU": 2.0}]) == 1
