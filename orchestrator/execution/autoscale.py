"""Ray adapter for what the sweep may use: the autoscaler's node types and the demand shown it, free resources.

Demand is made visible with `ray.autoscaler.sdk.request_resources` (not by releasing trials whose
placement groups wait): the queue still releases a trial only onto free resources of nodes that
passed the shared-storage check, so a node the autoscaler launches is checked before it gets a
gang and the queue's order holds (the next free gang goes to the queue's choice at that moment,
not to whichever pending group Ray places first). The request is the gangs of the trials running
or waiting, in queue order, capped by what the node types can hold; it is `[]` once nothing waits
(idle nodes can go) and when the driver ends.

Node types come from one of two places (`node_types`): the GCS cluster config that autoscaler v2
and KubeRay report, else the v1 monitor's config file on the head node, found from the monitor's
pid in its status record. Both are Ray internals (no public API lists node types in Ray 2.60); they
are read here only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from orchestrator.sweep.fit import NodeType

logger = logging.getLogger(__name__)
_STATUS_KEY = "__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS: the v1 monitor's record
_HEAD = "node:__internal_head__"  # the resource only the head node has


@dataclass(frozen=True)
class Autoscaler:
    types: tuple[NodeType, ...]
    max_workers: int | None  # the cluster's cap on worker nodes (None: only the per-type caps)


def node_types() -> Autoscaler | None:
    """The cluster's autoscaler (its worker node types), or None when the cluster has none."""
    found = _from_gcs_config()
    if found is None:
        found = _from_v1_monitor()
    if found is not None:
        logger.info("autoscaler: %s", ", ".join(f"{t.name} (max {t.max_workers}: {_shape(t.resources)})"
                                                for t in found.types) or "no worker node types")
    return found


def _shape(res: dict[str, float]) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def _from_gcs_config() -> Autoscaler | None:
    # Private: GlobalState.get_cluster_config (what Ray Data reads to see if the cluster autoscales).
    import ray._private.state as state

    try:
        config = state.state.get_cluster_config()
    except Exception:  # an older GCS without the key: fall back to the v1 monitor
        return None
    if config is None or not config.node_group_configs:
        return None
    types = tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                           10_000 if g.max_count < 0 else int(g.max_count))
                  for g in config.node_group_configs if g.max_count != 0)
    return Autoscaler(types, None)


def _from_v1_monitor() -> Autoscaler | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_STATUS_KEY)
    status = json.loads(raw) if raw else {}
    if "autoscaler_report" not in status or "monitor_pid" not in status:
        return None
    # Private: the v1 monitor keeps its config file's path on its command line only; read it on the head.
    read = ray.remote(_read_monitor_config).options(num_cpus=0, resources={_HEAD: 0.001}, max_retries=0)
    try:
        config = ray.get(read.remote(int(status["monitor_pid"])), timeout=60)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        logger.warning("autoscaler found, but its node types could not be read (%s): sizing on alive nodes only",
                       type(exc).__name__)
        return None
    if config is None:
        return None
    head = config.get("head_node_type")
    types = tuple(NodeType(name, {k: float(v) for k, v in (t.get("resources") or {}).items()},
                           int(t.get("max_workers", config.get("max_workers", 0))))
                  for name, t in (config.get("available_node_types") or {}).items() if name != head)
    return Autoscaler(types, config.get("max_workers"))


def _read_monitor_config(pid: int) -> dict[str, Any] | None:
    """On the head: the autoscaling config file the monitor process `pid` was started with."""
    import yaml

    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    path = next((a.decode().split("=", 1)[1] for a in args if a.startswith(b"--autoscaling-config=")), None)
    if path is None:
        return None
    return yaml.safe_load(Path(path).expanduser().read_text())  # JSON is YAML too


def running_by_type(types: tuple[NodeType, ...], nodes: list[dict[str, float]]) -> dict[str, int]:
    """Alive nodes per type, matched by their CPU and GPU totals (the head matches no worker type)."""
    out: dict[str, int] = {}
    for node in nodes:
        t = next((t for t in types if all(abs(node.get(k, 0.0) - t.resources.get(k, 0.0)) < 1e-9
                                          for k in ("CPU", "GPU"))), None)
        if t is not None:
            out[t.name] = out.get(t.name, 0) + 1
    return out


def free_resources() -> dict[str, dict[str, float]]:
    """Per alive node id: the CPUs and GPUs this driver could give a gang now: what nobody holds, plus
    what this job's placement groups hold (its trials' gangs, running or kept by Tune for reuse). Other
    jobs' and the pretrain tasks' resources are not free.

    Private API: `ray.available_resources()` only gives the cluster-wide sum, and the placement-group
    table names no job; a group's id ends with its job's id (Ray's PlacementGroupID layout).
    """
    import ray._private.state as state

    job = ray.get_runtime_context().get_job_id()
    free = {nid: {k: float(r.get(k, 0.0)) for k in ("CPU", "GPU")}
            for nid, r in state.available_resources_per_node().items()}
    for pg_id, group in ray.util.placement_group_table().items():
        if group["state"] != "CREATED" or not pg_id.endswith(job):
            continue
        for index, bundle in group["bundles"].items():
            node = free.get(group["bundles_to_node_id"].get(index, ""))
            for k in ("CPU", "GPU") if node is not None else ():
                node[k] += float(bundle.get(k, 0.0))
    return free


def request(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for capacity for these bundles in all (replaces the last request; [] drops it)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
