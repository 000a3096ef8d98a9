"""Ray adapter: reaching a cluster, what it can hold, pretrain tasks, and the Tune run of the trials.

The Tune experiment lives in SWEEP/tune with a fixed name, so `run` on an existing sweep restores it
(`Tuner.restore(resume_unfinished=True, resume_errored=True)`): finished trials stay finished,
interrupted and errored ones continue from their own checkpoints. Tune pickles the run config
(callbacks included) into the experiment and reuses it on restore, so the callback here is a
stateless shim that forwards to whichever `SweepMonitor` this driver process registered.

The trials are not a fixed grid: a `ForkSearcher` (equally a stateless shim, forwarding to this
driver's `orchestrator.execution.release.ReleaseQueue`) hands Tune each task (`Task.to_wire`) when it is
ready (a branch as soon as its trunk's fork checkpoint is on disk, while the trunk trains on) and
when the cluster has room for it. Tune asks it at every step; the callback tells the queue, at every step, which tasks Tune
already holds as trials (restored ones included), so a restarted driver releases nothing twice and
loses nothing the killed one released. The queue hands out a task only while fewer trials than the
cluster holds now run or wait (`orchestrator.execution.capacity`: free resources of checked nodes, re-read as
nodes join or leave; with an autoscaler, it also asks for the gangs that wait), so a freed gang goes
to the queue's choice at that moment.

A DDP trial's resources are its whole gang, one placement group (`trial_resources`; the gang itself
runs in `orchestrator.worker.gang`; the count is `orchestrator.sweep.fit`). `check_nodes` runs the shared-storage
check (`orchestrator.execution.storage`) as one task pinned to each alive node, or to each node that joins.

A preempted attempt is no failure: it first reports event "preempted" (`orchestrator.worker.reporting`;
Tune takes reports synchronously), on which the callback allows the trial one more failure, so its
error reschedules it like a retry (newest checkpoint, same MLflow run) and `retry.max_failures` is
spent on real failures only.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Collection

import ray
from ray import tune
from ray.tune.search import Searcher

from orchestrator.errors import ClusterError
from orchestrator.sweep.fit import gang_bundles
from orchestrator.sweep.spec import Resources
from orchestrator.worker.task import K_EVENT, K_WARNINGS, PREEMPTED, Task, wire_id, wire_name

# Sweeps started before the orchestrator had rooms pickled Tune's searcher and callback (`ForkSearcher`,
# `ForwardToMonitor`) under this module's old path; `resume` unpickles them through that name.
sys.modules.setdefault("orchestrator.ray_backend", sys.modules[__name__])

logger = logging.getLogger(__name__)

_MONITOR: Any = None  # the SweepMonitor of this driver process (see module docstring)
_QUEUE: Any = None  # the ReleaseQueue of this driver process
_LIMIT: Any = None  # this driver's view of the cluster (an orchestrator.execution.capacity.Capacity)


def resolve_address(spec_address: str | None) -> str | None:
    """The spec's address, else RAY_ADDRESS, else None (start a local cluster)."""
    return spec_address or os.environ.get("RAY_ADDRESS") or None


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """A TCP probe of host:port, so an unreachable cluster fails in seconds, before anything starts."""
    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"ray_address {address!r}: expected HOST:PORT (or ray://HOST:PORT, auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterError(f"ray_address {address}: cannot connect ({exc.strerror or exc})") from None


# Driver-side quiet: the live table owns stdout; trial logs are in each trial's train.log.
_QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def connect(address: str | None, env_vars: dict[str, str], log_to_driver: bool = False) -> None:
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():  # a caller (a test, a notebook) already connected: use that cluster
        return
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": log_to_driver,
                              "configure_logging": False}
    if address is None:
        # "local" always starts a fresh cluster (None would join any cluster this host started before,
        # even a dead one), bound to the loopback interface only.
        kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
        _loopback_only()
    try:
        ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"ray_address {address}: {str(exc).splitlines()[0]}") from None


def _loopback_only() -> None:
    """Make the local cluster's GCS, raylet, workers and agents listen on 127.0.0.1 only.

    Ray (2.60) turns `_node_ip_address="127.0.0.1"` into the host's outward IP and then binds its gRPC
    servers to all interfaces (`::`). Only with clusters off (its Windows/macOS single-host mode)
    does the node IP stay loopback, which binds every server there: the flag is read at import, so
    it is set for the processes Ray starts (env) and for this one (the already imported constant).
    """
    import ray._private.ray_constants as ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def capacity() -> dict[str, float]:
    return dict(ray.cluster_resources())


def node_resources() -> list[dict[str, float]]:
    """The total resources of every alive node (what gangs are packed onto)."""
    return list(alive_nodes().values())


def alive_nodes() -> dict[str, dict[str, float]]:
    """Node id -> total resources, of every alive node."""
    return {n["NodeID"]: dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")}


def trial_resources(res: Resources) -> Any:
    """Tune's resource request of a trial: the whole gang as one placement group (see `orchestrator.worker.gang`).

    Tune starts a trial only once its group is placed, and frees it when the trial ends, so a
    RUNNING trial holds all its GPUs and a trial waiting for them is PENDING.
    """
    if res.workers == 1:
        return {k.lower(): v for k, v in gang_bundles(res)[0].items()}
    return tune.PlacementGroupFactory(gang_bundles(res), strategy="STRICT_PACK" if res.one_node else "PACK")


def check_nodes(token_path: Path | str, token: str, paths: list[tuple[str, str]],
                only: Collection[str] | None = None, scratch: str | None = None) -> dict[str, tuple[str, list[str]]]:
    """One task pinned to each alive node (of `only`, if given) checks the shared storage there;
    node id -> (host, what it misses), for the nodes that miss something."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.execution.storage import check_here

    probe = ray.remote(_probe)
    refs = {n["NodeID"]: (n.get("NodeManagerHostname") or n.get("NodeManagerAddress", "?"), probe.options(
        num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
    ).remote(check_here, str(token_path), token, paths, scratch)) for n in ray.nodes()
            if n.get("Alive") and (only is None or n["NodeID"] in only)}
    failures = {}
    for node, (host, ref) in refs.items():
        try:
            missing = ray.get(ref, timeout=120)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            missing = [f"anything (its check failed: {type(exc).__name__})"]
        if missing:
            failures[node] = (host, missing)
    return failures


def _probe(fn: Any, *args: Any) -> Any:
    return fn(*args)


class PretrainJobs:
    """The sweep's pretrain jobs, running as Ray tasks (in parallel) beside the trials that do not need them.

    The driver polls them at every Tune step (`poll`): a finished job's backbone is on disk (its
    done.json), which makes the trials that use it ready in the queue; a failed one is logged in one
    line and its trials are released to fail on the missing backbone rather than wait for ever.
    What a running job holds is not free, so the queue's count of free resources leaves it out.
    """

    def __init__(self, jobs: list[tuple[str, dict[str, Any], Resources]], max_retries: int,
                 store: dict[str, Any] | None = None):
        from orchestrator.worker.trainable import run_pretrain_job

        remote = ray.remote(run_pretrain_job)
        self.refs: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        for name, cfg, res in jobs:
            self.refs[name] = remote.options(num_cpus=res.cpus_per_trial, num_gpus=min(res.gpus_per_trial, 1.0),
                                             max_retries=max_retries, retry_exceptions=True,
                                             name=f"pretrain-{name}").remote(cfg, store)
            logger.info("pretrain job %s started", name)

    def poll(self, timeout: float = 0.0) -> None:
        """Collect the jobs that ended (without blocking unless `timeout`)."""
        if not self.refs:
            return
        ready, _ = ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=timeout)
        for name, ref in [(n, r) for n, r in self.refs.items() if r in ready]:
            del self.refs[name]
            try:
                logger.info("pretrain job %s done: %s", name, ray.get(ref))
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                text = str(cause).strip()
                self.failed[name] = f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"
                logger.error("pretrain job %s failed: %s", name, self.failed[name])

    def wait(self) -> dict[str, str]:
        """Block until every job ended; job name -> failure (empty when all succeeded)."""
        while self.refs:
            self.poll(timeout=5.0)
        return dict(self.failed)


def _trial_name(trial) -> str:
    return wire_name(trial.config["trial"])


def run_tune(sweep_dir: Path, tasks: list[Task], res: Resources, max_failures: int,
             concurrent: int, monitor: Any, trainable: Any = None, pretrain: PretrainJobs | None = None,
             capacity: Any = None, job_done: Any = None, store_uri: str | None = None) -> None:
    """Fan the trials out (or restore the sweep's experiment) and block until Tune is done.

    `store_uri`: an object-store sweep's root; Tune keeps its experiment there (STORE/tune), not in
    the driver's local mirror, so a driver on another machine restores it.
    `trainable` (default: `trainable.run_trial`) is what each trial runs; bench/cluster_sim.py
    passes a paced stand-in to measure the scheduling alone. `pretrain`: the sweep's pretrain jobs
    still running; the trials that need one of them are released once its backbone is on disk.
    `capacity`: the driver's `orchestrator.execution.capacity.Capacity` (default: every alive node counts,
    no autoscaler); `concurrent` is only the figure logged at start. `job_done(job)`: whether a
    pretrain job's backbone is on disk (default: no pretrain jobs, always).
    """
    from orchestrator.execution.capacity import Capacity
    from orchestrator.execution.release import ReleaseQueue
    from orchestrator.worker.trainable import run_trial

    global _MONITOR, _QUEUE, _LIMIT
    _MONITOR = monitor
    _LIMIT = capacity or Capacity(res, set(alive_nodes()), None, pretrain, most=concurrent)
    _LIMIT.pretrain = pretrain
    # Every task goes through the queue, forked or not: it releases a task when the cluster has room
    # for it now (nodes that join count at once) and when it is ready (a trunk's checkpoint, a backbone).
    _QUEUE = ReleaseQueue(tasks, job_done or (lambda job: True))
    _QUEUE.limit = _LIMIT.limit()
    trainable = tune.with_resources(trainable or run_trial, trial_resources(res))
    root = store_uri or str(sweep_dir)
    try:
        _fit(f"{root}/tune", root, trainable, max_failures)
    finally:
        _LIMIT.close()


def _fit(exp_dir: str, sweep_dir: str, trainable: Any, max_failures: int) -> None:
    if tune.Tuner.can_restore(str(exp_dir)):
        logger.info("restoring the sweep's Tune experiment from %s", exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        names = {"trial_name_creator": _trial_name, "trial_dirname_creator": _trial_name}
        # num_samples=-1: as many as the searcher hands out, until it says FINISHED. No
        # max_concurrent_trials: it would be fixed at start, and its ConcurrencyLimiter would persist
        # live-trial ids a killed driver can leave stale; the queue bounds the trials running or waiting
        # itself (`ReleaseQueue.limit`, re-read from the cluster as nodes leave or join).
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ForkSearcher(), num_samples=-1, reuse_actors=True, **names),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[ForwardToMonitor()],
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # Trials report progress only, no Tune checkpoints (`orchestrator.worker.reporting`); an
                # experiment of older code holds some: keep them all, as that code did (a driver killed
                # between Tune's deletion and its state snapshot would leave a state naming a deleted one).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        )
    tuner.fit()


class ForkSearcher(Searcher):
    """Stateless (picklable) shim: Tune's "next trial?" -> this process's ReleaseQueue.

    Its name and module are pickled into the Tune experiment (tuner.pkl): an older sweep restores it by them.
    """

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        from orchestrator.execution.release import FINISHED

        if _QUEUE is None:
            return None
        # With no trial at all Tune asks here once a second, without steps, for up to 10 minutes:
        # the cluster is re-read here too, or nodes the autoscaler launched would go unseen that long.
        _refresh(None)
        task = _QUEUE.next()
        if task == FINISHED:
            return Searcher.FINISHED
        return None if task is None else {"trial": task.to_wire()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the queue reads trial states from Tune's trial list (ForwardToMonitor.on_step_begin)

    # Nothing to persist: the queue is rebuilt from the spec and Tune's restored trial list.
    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text("{}")

    def restore(self, checkpoint_path: str) -> None:
        pass


class ForwardToMonitor(tune.Callback):
    """Stateless (picklable) shim: Tune events -> this process's SweepMonitor (pickled by name, as above)."""

    @staticmethod
    def _tid(trial) -> str:
        return wire_id(trial.config["trial"])

    def on_trial_start(self, iteration, trials, trial, **info):
        if _MONITOR is not None:
            _MONITOR.on_start(self._tid(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(K_WARNINGS):  # e.g. a damaged checkpoint the attempt skipped: say so where it is watched
            logger.warning("trial %s: %s", _trial_name(trial), result[K_WARNINGS])
        if result.get(K_EVENT) == PREEMPTED and trial.max_failures >= 0:
            trial.max_failures += 1  # the error that follows is this preemption's (see module docstring)
        if _MONITOR is not None:
            _MONITOR.on_result(self._tid(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _MONITOR is not None:
            _MONITOR.on_complete(self._tid(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _MONITOR is not None:
            _MONITOR.on_error(self._tid(trial), final=False, error=_error_text(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if _MONITOR is not None:
            _MONITOR.on_error(self._tid(trial), final=True, error=_error_text(trial))

    def on_step_begin(self, iteration, trials, **info):
        _refresh(trials)  # before Tune asks the searcher for more trials, in the same step

    def on_step_end(self, iteration, trials, **info):
        if _MONITOR is not None:
            _MONITOR.tick()


def _refresh(trials: list | None) -> None:
    """Tell the queue Tune's trials (if given) and the room on the cluster now; show the autoscaler
    the gangs that wait."""
    if _QUEUE is None or _LIMIT is None:
        return
    if trials is not None:
        _QUEUE.sync((wire_id(t.config["trial"]), t.status) for t in trials if "trial" in t.config)
    _QUEUE.limit = _LIMIT.limit()  # logs when the cluster changed
    if _LIMIT.pretrain is not None:
        _QUEUE.failed_jobs = set(_LIMIT.pretrain.failed)
    if _LIMIT.auto is not None:
        _LIMIT.demand(_QUEUE.running, _QUEUE.active - _QUEUE.running + _QUEUE.waiting())


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text() if path else ""
    except OSError:
        return ""
