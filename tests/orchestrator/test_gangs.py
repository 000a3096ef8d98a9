"""How many whole gangs a cluster holds, and what a DDP trial asks Tune for (no cluster needed)."""

from __future__ import annotations

import pytest

from orchestrator.errors import ClusterError
from orchestrator.sweep.fit import gang_bundles, gangs_that_fit, max_concurrent, without
from orchestrator.execution.ray_backend import trial_resources
from orchestrator.sweep.spec import Resources

NODE = {"CPU": 3.0, "GPU": 2.0}


def test_a_ddp_trial_asks_for_its_whole_gang():
    res = Resources(gpus_per_trial=2, cpus_per_trial=2)
    pgf = trial_resources(res)
    assert pgf.bundles == [{"CPU": 0.01}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert pgf.strategy == "PACK"
    assert trial_resources(Resources(gpus_per_trial=1, cpus_per_trial=4)) == {"cpu": 4.0, "gpu": 1.0}


@pytest.mark.parametrize("gpus, cpus, nodes, fits", [
    (2, 2, [NODE, NODE], 2),  # the test cluster: 2 gangs, one per node
    (2, 2, [NODE], 1),  # a node left
    (2, 2, [NODE] * 3, 3),  # a node joined
    (4, 4, [NODE, NODE], 1),  # spread over both nodes (PACK may split a gang)
    (2, 6, [NODE, NODE], 0),  # 3 CPUs per worker + the trial's own 0.01: never fits next to a rank
    (1, 1, [{"CPU": 4.0, "GPU": 2.0}], 2),
    (0, 1, [{"CPU": 4.0}], 4),
])
def test_gangs_that_fit(gpus, cpus, nodes, fits):
    assert gangs_that_fit(gang_bundles(Resources(gpus_per_trial=gpus, cpus_per_trial=cpus)), nodes) == fits


def test_a_trial_that_never_fits_is_one_line():
    with pytest.raises(ClusterError) as err:
        max_concurrent(Resources(gpus_per_trial=8, cpus_per_trial=8), [NODE, NODE])
    msg = str(err.value)
    assert "\n" not in msg and "4 GPUs" in msg and "8 GPUs" in msg


def test_one_node_gangs_need_a_node_that_holds_them_whole():
    spread = Resources(gpus_per_trial=4, cpus_per_trial=4)
    whole = Resources(gpus_per_trial=4, cpus_per_trial=4, one_node=True)
    assert trial_resources(whole).strategy == "STRICT_PACK"
    assert gangs_that_fit(gang_bundles(spread), [NODE, NODE]) == 1
    assert gangs_that_fit(gang_bundles(whole), [NODE, NODE], one_node=True) == 0
    assert gangs_that_fit(gang_bundles(whole), [{"CPU": 8.0, "GPU": 8.0}] * 2, one_node=True) == 2  # 4.01 CPUs each
    assert gangs_that_fit(gang_bundles(whole), [{"CPU": 9.0, "GPU": 8.0}] * 2, one_node=True) == 4
    with pytest.raises(ClusterError, match=r"4 GPUs on one node \(resources.one_node\)"):
        max_concurrent(whole, [NODE, NODE])


def test_running_pretrain_jobs_hold_trial_slots():
    nodes = [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 0.0}]
    one_cpu = gang_bundles(Resources(gpus_per_trial=0, cpus_per_trial=1))
    assert gangs_that_fit(one_cpu, nodes) == 3
    held = without(nodes, [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 0.0}])
    assert gangs_that_fit(one_cpu, held) == 1 and nodes[0]["CPU"] == 2.0  # the input is not changed
