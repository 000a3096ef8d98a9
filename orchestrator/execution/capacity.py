"""The driver's live view of the cluster (a Ray adapter): how many trials may run or wait now, which
nodes passed the shared-storage check, and, with an autoscaler, the demand the sweep shows it.

Re-read every `LIMIT_TTL_S`, so nodes that join or leave count at once, forked or unforked, without
a `resume`. The count is the gangs that the checked nodes hold with what is free for this sweep
(`autoscale.free_resources`: unheld, or held by this sweep's own gangs, running or kept by Tune for
its next trial) by `fit.trials_at_once`: GPUs another job or a pretrain task holds do not count.
A node seen for the first time is storage-checked first (`ray_backend.check_nodes`); one that fails
is named in one error line and never counted, so no trial is released for it. (Ray may still place
a gang released for another node's free resources there; the check's window is one re-read.)
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import orchestrator.execution.autoscale as autoscale
from orchestrator.sweep.fit import autoscaler_nodes, gang_bundles, max_concurrent, trials_at_once
from orchestrator.sweep.spec import Resources

logger = logging.getLogger(__name__)
LIMIT_TTL_S = 1.0  # how often the free resources of the (changing) cluster are re-read
Checker = Callable[[list[str]], dict[str, tuple[str, list[str]]]]  # node ids -> failures (ray_backend.check_nodes)


def most_at_once(res: Resources, auto: autoscale.Autoscaler | None, alive: list[dict[str, float]]) -> int:
    """Trials the cluster could ever hold at once: its alive nodes, plus every node its autoscaler may
    still launch. A ClusterError (one line) when not even one trial fits, before anything starts."""
    if auto is None:
        return max_concurrent(res, alive)
    extra = autoscaler_nodes(list(auto.types), autoscale.running_by_type(auto.types, alive), auto.max_workers)
    return max_concurrent(res, alive + extra, autoscaled=True)


class Capacity:
    """How many trials may run or wait now (`limit`), and the autoscaler's request (`demand`)."""

    def __init__(self, res: Resources, checked: set[str], check: Checker | None, pretrain: Any = None,
                 auto: autoscale.Autoscaler | None = None, most: int = 0):
        self.res, self.check, self.pretrain, self.auto, self.most = res, check, pretrain, auto, most
        self.checked = set(checked)  # nodes that passed the storage check
        self.refused: set[str] = set()  # nodes that failed it: never counted
        self.value: int | None = None
        self.at: float | None = None
        self.asked = -1  # gangs in the autoscaler request now (-1: not set by this driver yet)

    def limit(self) -> int:
        """How many trials may run or wait now: the gangs that the checked nodes' resources hold, less
        what others hold (this sweep's own gangs count as its own: they run or wait for reuse)."""
        from orchestrator.execution.ray_backend import alive_nodes

        if self.pretrain is not None:
            self.pretrain.poll()  # a job that ended frees its resources and readies its trials
        if self.at is not None and time.monotonic() - self.at < LIMIT_TTL_S and self.value is not None:
            return self.value
        self.at = time.monotonic()
        alive = alive_nodes()
        self._check_new([n for n in alive if n not in self.checked and n not in self.refused])
        free = autoscale.free_resources()
        n = trials_at_once(self.res, [free[x] for x in alive if x in self.checked and x in free])
        if n != self.value:
            logger.info("at most %d trial(s) at a time now (%d checked node(s) alive)", n,
                        sum(1 for x in alive if x in self.checked))
            self.value = n
        return n

    def _check_new(self, new: list[str]) -> None:
        if not new or self.check is None:
            self.checked.update(new)
            return
        failures = self.check(new)
        for node, (host, missing) in failures.items():
            logger.error("node %s (%s) joined but does not see %s: no trial goes there (shared storage, see README)",
                         node[:12], host, ", ".join(missing))
            self.refused.add(node)
        ok = [n for n in new if n not in failures]
        if ok:
            logger.info("node(s) joined, shared storage checked: %s", ", ".join(n[:12] for n in ok))
        self.checked.update(ok)

    def demand(self, running: int, waiting: int) -> None:
        """With an autoscaler: ask for the gangs of the trials running and waiting (released but not
        placed, or ready in the queue), at most what the node types hold; nothing once none waits."""
        if self.auto is None:
            return
        gangs = min(running + waiting, self.most) if waiting else 0
        if gangs == self.asked:
            return
        logger.info("autoscaler: asking for %d gang(s) (%d running, %d waiting)", gangs, running, waiting)
        autoscale.request(self._bundles(gangs))
        self.asked = gangs

    def _bundles(self, gangs: int) -> list[dict[str, float]]:
        one = gang_bundles(self.res)
        if self.res.one_node:  # STRICT_PACK: the autoscaler must find the whole gang one node
            one = [{k: sum(b.get(k, 0.0) for b in one) for k in ("CPU", "GPU")}]
        return [dict(b) for _ in range(gangs) for b in one]

    def close(self) -> None:
        """Drop the autoscaler request (the driver ends: idle nodes can go)."""
        if self.auto is None:
            return
        try:
            autoscale.request([])
        except Exception as exc:  # the connection is going with the driver: say so, do not hide why it ends
            logger.warning("autoscaler: could not drop the resource request (%s); `ray.autoscaler.sdk."
                           "request_resources(bundles=[])` drops it", type(exc).__name__)
            return
        self.asked = 0
        logger.info("autoscaler: request dropped")
