"""A DDP trial's gang: its G worker processes, started inside the trial's own placement group (a Ray adapter).

Tune gives a multi-worker trial one placement group for the whole gang (`ray_backend.trial_resources`:
bundle 0 for the trial's own process, bundles 1..G for the workers), so the trial only counts as
RUNNING once every GPU and CPU of its gang is reserved, and holds them until it ends. Here the
trial starts one Ray actor per bundle (rank = bundle - 1), joins them in a torch.distributed
process group (backend from `trainer.engine.train_loop.dist_backend`: NCCL with CUDA, gloo without) and waits.

Ray Train's TorchTrainer is not used: in this Ray (Train V2) its controller makes a placement group of
its own for the workers, outside the trial's, so each waiting trial would hold nothing while its
group waits (and times out, and is made again) behind the others. Here nothing is reserved twice and
no group is made that is not placed.

Any rank failing (an exception, a lost node, a failed setup) kills the whole gang and fails the
attempt; Tune then retries the trial (a fresh gang, wherever its placement group fits now) from the
trial's newest checkpoint, and its placement group goes back to the cluster with the trial.
Rank 0 reports through a Ray queue living with the trial's process (bundle 0).

Preemption with notice (`trainer.engine.preemption`): each worker takes a SIGTERM of its own as a notice
(installed in the actor's `__init__`, its main thread; `run` runs in another); a notice to the
trial's own process is passed on to every rank (`notice`). The ranks agree on the iteration, rank 0
writes its checkpoint, and every rank ends with `PreemptedError`: then the trial waits for all of
them (rank 0's last reports still come through the queue) and ends with that error, which the driver
counts as a preemption, not a failure. A node drained for preemption (`ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`) sends no signal: the trial polls Ray's
drain table (`drain_notice`, as Ray Train's own preemption watcher does) for the nodes of its gang and
its own, and a drain there is the same notice.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.errors import OrchestratorError
from orchestrator.worker.task import Task
from trainer.trial_dir import GANG

logger = logging.getLogger(__name__)
POLL_S = 0.5
DRAIN_POLL_S = 2.0  # how often a trial looks whether one of its nodes is being drained


class GangWorker:
    """One rank of a DDP trial (a Ray actor in bundle rank + 1 of the trial's placement group)."""

    def __init__(self) -> None:
        from trainer.engine.preemption import install

        install(always=True)  # this process exists only to train: a SIGTERM is always a notice

    def notice(self, reason: str) -> None:
        """The trial's process got a preemption notice: stop at this rank's next step end too."""
        from trainer.engine.preemption import request

        request(reason)

    def where(self) -> dict[str, Any]:
        """This worker's node, IP, assigned GPU ids and a free port (used if it is rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        ctx = ray.get_runtime_context()
        return {"ip": ray.util.get_node_ip_address(), "port": port, "node_id": ctx.get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def run(self, fn: Callable[..., None], loop_config: dict[str, Any], rank: int, world: int, master: str,
            node_gpus: list[str]) -> None:
        import os

        # As Ray Train does: every rank sees all the GPUs its gang holds on its node (so NCCL can use
        # peer-to-peer between them) and picks its own by LOCAL_RANK. Set before torch touches CUDA.
        own = [str(g) for g in ray.get_gpu_ids()]
        local = node_gpus.index(own[0]) if own and own[0] in node_gpus else 0
        if node_gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))

        import torch.distributed as dist

        from trainer.engine.train_loop import init_distributed

        task = Task.from_wire(loop_config["task"])  # this rank's one validation of the task
        loop_config = {**loop_config, "task": task}
        backend = init_distributed(task.config.runtime, rank, world, master)
        logging.getLogger(__name__).info("rank %d/%d joined %s (%s)", rank, world, master, backend)
        row = {"attempt": loop_config["attempt"], "rank": rank, "world": world, "backend": backend,
               "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
               "pid": os.getpid(), "start": time.time()}
        try:
            fn(loop_config, rank)
        finally:
            dist.destroy_process_group()
            # Each rank's own record of when it trained where (gang.jsonl in the trial folder).
            task.folder.add_row(GANG, {**row, "end": time.time()})


def run_gang(task: Task, fn: Callable[[dict[str, Any], int], None], loop_config: dict[str, Any],
             report: Callable[[dict[str, Any]], None]) -> None:
    """Run `fn(loop_config, rank)` on every rank of the trial's gang; forward rank 0's queue to `report`."""
    pg = get_current_placement_group()
    if pg is None:
        raise OrchestratorError(f"trial {task.name}: a DDP trial must run in its gang's placement group")
    world = task.workers
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, 0)})
    worker_cls = ray.remote(GangWorker)
    options: dict[str, Any] = {"num_cpus": task.cpus_per_worker, "max_restarts": 0, "max_concurrency": 2}
    if task.gpus_per_worker:
        options["num_gpus"] = task.gpus_per_worker
    workers = [worker_cls.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=rank + 1, placement_group_capture_child_tasks=True)).remote()
        for rank in range(world)]
    try:
        where = ray.get([w.where.remote() for w in workers])
        logger.info("gang of %s: %s", task.name, ", ".join(f"rank {r} on node {w['node_id'][:8]} gpus "
                                                          f"{w['gpu_ids']}" for r, w in enumerate(where)))
        master = f"{where[0]['ip']}:{where[0]['port']}"
        task.folder.add_row(GANG, {"attempt": loop_config["attempt"], "placement_group": pg.id.hex(),
                                   "gang_start": time.time(), "nodes": [w["node_id"] for w in where]})
        config = {**loop_config, "queue": queue}
        node_gpus: dict[str, list[str]] = {}
        for w in where:
            node_gpus.setdefault(w["node_id"], []).extend(w["gpu_ids"])
        refs = [w.run.remote(fn, config, rank, world, master, node_gpus[where[rank]["node_id"]])
                for rank, w in enumerate(workers)]
        nodes = {w["node_id"] for w in where} | {ray.get_runtime_context().get_node_id()}
        _wait(refs, workers, queue, report, nodes)
    finally:
        for w in workers:  # a rank blocked in a collective of a dead peer never returns by itself
            ray.kill(w, no_restart=True)
        queue.shutdown(force=True)


def _wait(refs: list[Any], workers: list[Any], queue: Queue, report: Callable[..., None], nodes: set[str]) -> None:
    from trainer.engine.preemption import PreemptedError, request, requested

    pending, preempted, told, polled = list(refs), None, False, 0.0
    while pending:
        _drain(queue, report)
        if not requested() and time.monotonic() - polled > DRAIN_POLL_S:
            polled = time.monotonic()
            why = drain_notice(nodes)
            if why:
                request(why)
        if not told and requested():  # this process got the notice: so do the ranks
            told = True
            for w in workers:
                w.notice.remote(f"the trial's notice: {requested()['reason']}")
        done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        for ref in done:
            try:
                ray.get(ref)  # raises the rank's error (or ActorDiedError for a lost node): the gang fails
            except ray.exceptions.RayTaskError as exc:
                if not isinstance(exc.cause, PreemptedError):
                    raise
                preempted = preempted or exc.cause  # the other ranks stop at the same iteration
    _drain(queue, report)
    if preempted is not None:
        raise preempted


def _drain(queue: Queue, report: Callable[..., None]) -> None:
    while True:
        try:
            metrics = queue.get_nowait()
        except Empty:
            return
        report(metrics)


def drain_notice(nodes: Any) -> str | None:
    """"node X drained, deadline in N s" if one of `nodes` (hex ids) is being drained, else None."""
    from ray._private.state import state  # Ray's drain table: {node id: deadline in ms, 0 = none}

    try:
        drained = state.get_draining_nodes() or {}
    except Exception as exc:  # a GCS hiccup: the next poll asks again
        logger.debug("could not read the drained nodes: %s", exc)
        return None
    for node in nodes:
        if node in drained:
            deadline = int(drained[node])
            left = f", deadline in {max(deadline / 1000 - time.time(), 0):.0f} s" if deadline else ""
            return f"node {node[:8]} drained{left}"
    return None
