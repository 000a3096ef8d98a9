"""How many gangs a set of nodes holds: the one fit count that `run`, the live queue and `plan --gpus` share.

A trial's resources are its gang (`gang_bundles`: for a DDP trial, a small CPU bundle for the trial's
own process plus one bundle per worker; Tune asks them as one placement group). The count is first
fit, bundle by bundle (Ray's PACK may spread a gang over nodes), or the whole gang on one node
(`one_node`: STRICT_PACK), so a node whose CPUs the workers fill cannot also take the trial's own
bundle. Nodes here are plain {"CPU": n, "GPU": m} dicts: totals, free resources, or the nodes an
autoscaler could launch (`autoscaler_nodes`). Pure: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ClusterError
from orchestrator.sweep.spec import Resources

DRIVER_CPU = 0.01  # what a DDP trial's own process holds while its gang's workers hold the rest


@dataclass(frozen=True)
class NodeType:
    """A worker node type of the cluster's autoscaler: what one node holds and how many may run."""

    name: str
    resources: dict[str, float]
    max_workers: int


def gang_bundles(res: Resources) -> list[dict[str, float]]:
    """What one trial holds while it runs: its own process, plus one bundle per DDP worker."""
    if res.workers == 1:
        one = {"CPU": res.cpus_per_trial}
        if res.gpus_per_trial:
            one["GPU"] = res.gpus_per_trial
        return [one]
    worker = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        worker["GPU"] = res.gpus_per_worker
    return [{"CPU": DRIVER_CPU}] + [dict(worker) for _ in range(res.workers)]


def gangs_that_fit(bundles: list[dict[str, float]], nodes: list[dict[str, float]], one_node: bool = False,
                   limit: int = 100_000) -> int:
    """How many gangs of `bundles` the nodes hold at once: first fit, bundle by bundle (PACK may spread
    a gang), or the whole gang on one node (`one_node`: STRICT_PACK)."""
    free = [{k: float(n.get(k, 0.0)) for k in ("CPU", "GPU")} for n in nodes]
    if one_node:
        bundles = [{k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}]
    count = 0
    while count < limit:
        trial = [dict(f) for f in free]
        for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0))):
            node = next((f for f in trial if all(f[k] + 1e-9 >= v for k, v in bundle.items())), None)
            if node is None:
                return count
            for k, v in bundle.items():
                node[k] -= v
        free = trial
        count += 1
    return count


def trials_at_once(res: Resources, nodes: list[dict[str, float]]) -> int:
    return gangs_that_fit(gang_bundles(res), nodes, res.one_node)


def max_concurrent(res: Resources, nodes: list[dict[str, float]], autoscaled: bool = False) -> int:
    """How many trials the nodes hold at once; a ClusterError (one line) if not even one, ever.

    `autoscaled`: the nodes are every node the cluster's autoscaler could run (`autoscaler_nodes`).
    """
    n = trials_at_once(res, nodes)
    if n < 1:
        cpus = sum(x.get("CPU", 0.0) for x in nodes)
        gpus = sum(x.get("GPU", 0.0) for x in nodes)
        big = max((x.get("GPU", 0.0) for x in nodes), default=0.0)
        need_cpu = sum(b.get("CPU", 0.0) for b in gang_bundles(res))
        where = " on one node (resources.one_node)" if res.one_node else ""
        what = "the cluster with every node its autoscaler may launch" if autoscaled else "the cluster"
        raise ClusterError(f"{what} ({len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs, at most {big:g} GPUs "
                           f"on one node) cannot hold one trial ({res.workers} worker(s), {need_cpu:g} CPUs, "
                           f"{res.gpus_per_trial:g} GPUs{where}); lower resources or add "
                           + ("node types" if autoscaled else "nodes"))
    return n


def without(nodes: list[dict[str, float]], held: list[dict[str, float]]) -> list[dict[str, float]]:
    """The nodes' resources less `held` (each bundle taken from the first node that has it)."""
    free = [dict(n) for n in nodes]
    for bundle in held:
        node = next((f for f in free if all(f.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
        for k, v in (bundle.items() if node is not None else ()):
            node[k] = node.get(k, 0.0) - v
    return free


def autoscaler_nodes(types: list[NodeType], running: dict[str, int], max_workers: int | None) -> list[dict[str, float]]:
    """The nodes the autoscaler could still launch: per type, its max_workers less those of it running,
    within the cluster's max_workers less all workers running (`running`: type name -> nodes alive)."""
    room = None if max_workers is None else max(0, max_workers - sum(running.values()))
    out: list[dict[str, float]] = []
    for t in types:
        n = max(0, t.max_workers - running.get(t.name, 0))
        if room is not None:
            n, room = min(n, room), room - min(n, room)
        out += [dict(t.resources) for _ in range(n)]
    return out


def nodes_of_shape(gpus: int, node_gpus: int, node_cpus: float) -> list[dict[str, float]]:
    """`plan --gpus N --node G,C`: N/G nodes of G GPUs and C CPUs each."""
    if node_gpus < 1 or gpus % node_gpus:
        raise ClusterError(f"--gpus {gpus} is not a whole number of {node_gpus}-GPU nodes")
    return [{"CPU": float(node_cpus), "GPU": float(node_gpus)} for _ in range(gpus // node_gpus)]
