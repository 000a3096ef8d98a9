"""Ray adapter: reaching a cluster, what it can hold, pretrain tasks, and the Tune run of the trials.

The Tune experiment lives in SWEEP/tune with a fixed name, so `run` on an existing sweep restores it
(`Tuner.restore(resume_unfinished=True, resume_errored=True)`): finished trials stay finished,
interrupted and errored ones continue from their own checkpoints. Tune pickles the run config
(callbacks included) into the experiment and reuses it on restore, so the callback here is a
stateless shim that forwards to whichever `SweepMonitor` this driver process registered.

With schedule branches the trials are not a fixed grid: a `ForkSearcher` (equally a stateless shim,
forwarding to this driver's `orchestrator.fork.ForkQueue`) hands Tune each task when it is ready, a
branch as soon as its trunk's fork checkpoint is on disk, while the trunk trains on. Tune asks it at
every step; the callback tells the queue, at every step, which tasks Tune already holds as trials
(restored ones included), so a restarted driver releases nothing twice and loses nothing the killed
one released. The queue hands out a task only while fewer trials than the cluster holds run or wait
(`max_concurrent`, re-read by `_Limit`), so a freed gang goes to the queue's choice at that moment.

A DDP trial's resources are its whole gang, one placement group (`trial_resources`; the gang itself
runs in `orchestrator.gang`); `max_concurrent` counts how many such gangs the alive nodes hold and
refuses, in one line, a trial that never fits. `check_nodes` runs the shared-storage check
(`orchestrator.storage`) as one task pinned to each alive node.

A preempted attempt is no failure: it first reports event "preempted" (`orchestrator.trial_report`;
Tune takes reports synchronously), on which the callback allows the trial one more failure, so its
error reschedules it like a retry (newest checkpoint, same MLflow run) and `retry.max_failures` is
spent on real failures only.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search import Searcher

from orchestrator.errors import ClusterError, OrchestratorError
from orchestrator.monitor import K_EVENT
from orchestrator.spec import Resources
from orchestrator.trial_report import K_WARNINGS, PREEMPTED

logger = logging.getLogger(__name__)

_MONITOR: Any = None  # the SweepMonitor of this driver process (see module docstring)
_QUEUE: Any = None  # the ForkQueue of this driver process, with schedule branches
_LIMIT: Any = None  # this driver's view of how many gangs the cluster holds (a _Limit)
DRIVER_CPU = 0.01  # what a DDP trial's own process holds while its gang's workers hold the rest
LIMIT_TTL_S = 5.0  # how often the forked queue re-reads how many gangs the (changing) cluster holds


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
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


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


def trial_resources(res: Resources) -> Any:
    """Tune's resource request of a trial: the whole gang as one placement group (see `orchestrator.gang`).

    Tune starts a trial only once its group is placed, and frees it when the trial ends, so a
    RUNNING trial holds all its GPUs and a trial waiting for them is PENDING.
    """
    if res.workers == 1:
        return {k.lower(): v for k, v in gang_bundles(res)[0].items()}
    return tune.PlacementGroupFactory(gang_bundles(res), strategy="STRICT_PACK" if res.one_node else "PACK")


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


def max_concurrent(res: Resources, nodes: list[dict[str, float]]) -> int:
    """How many trials the cluster holds at once; a ClusterError (one line) if not even one, ever."""
    n = gangs_that_fit(gang_bundles(res), nodes, res.one_node)
    if n < 1:
        cpus = sum(x.get("CPU", 0.0) for x in nodes)
        gpus = sum(x.get("GPU", 0.0) for x in nodes)
        big = max((x.get("GPU", 0.0) for x in nodes), default=0.0)
        need_cpu = sum(b.get("CPU", 0.0) for b in gang_bundles(res))
        where = " on one node (resources.one_node)" if res.one_node else ""
        raise ClusterError(f"the cluster ({len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs, at most {big:g} GPUs "
                           f"on one node) cannot hold one trial ({res.workers} worker(s), {need_cpu:g} CPUs, "
                           f"{res.gpus_per_trial:g} GPUs{where}); lower resources or add nodes")
    return n


def check_nodes(token_path: Path, token: str, paths: list[tuple[str, str]]) -> dict[str, tuple[str, list[str]]]:
    """One task pinned to each alive node checks the shared storage there; node id -> (host, what it misses)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.storage import check_here

    probe = ray.remote(_probe)
    refs = {n["NodeID"]: (n.get("NodeManagerHostname") or n.get("NodeManagerAddress", "?"), probe.options(
        num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
    ).remote(check_here, str(token_path), token, paths)) for n in ray.nodes() if n.get("Alive")}
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
    `held` is what the running jobs hold, so the queue counts those slots as taken.
    """

    def __init__(self, jobs: list[tuple[str, dict[str, Any], Resources]], max_retries: int):
        from orchestrator.trainable import run_pretrain_job

        remote = ray.remote(run_pretrain_job)
        self.refs: dict[str, Any] = {}
        self.resources = {name: res for name, _, res in jobs}
        self.failed: dict[str, str] = {}
        for name, cfg, res in jobs:
            self.refs[name] = remote.options(num_cpus=res.cpus_per_trial, num_gpus=min(res.gpus_per_trial, 1.0),
                                             max_retries=max_retries, retry_exceptions=True,
                                             name=f"pretrain-{name}").remote(cfg)
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

    def held(self) -> list[dict[str, float]]:
        """What the jobs still running hold (a bundle each)."""
        out = []
        for name in self.refs:
            res = self.resources[name]
            out.append({"CPU": res.cpus_per_trial, "GPU": min(res.gpus_per_trial, 1.0)})
        return out

    def wait(self) -> dict[str, str]:
        """Block until every job ended; job name -> failure (empty when all succeeded)."""
        while self.refs:
            self.poll(timeout=5.0)
        return dict(self.failed)


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def run_tune(sweep_dir: Path, tasks: list[dict[str, Any]], res: Resources, max_failures: int,
             concurrent: int, monitor: Any, trainable: Any = None, pretrain: PretrainJobs | None = None) -> None:
    """Fan the trials out (or restore the sweep's experiment) and block until Tune is done.

    `trainable` (default: `trainable.run_trial`) is what each trial runs; bench/cluster_sim.py
    passes a paced stand-in to measure the scheduling alone. `pretrain`: the sweep's pretrain jobs
    still running; the trials that need one of them are released once its backbone is on disk.
    """
    from orchestrator.fork import ForkQueue
    from orchestrator.trainable import run_trial

    global _MONITOR, _QUEUE, _LIMIT
    _MONITOR = monitor
    # Tasks that wait for something (a trunk's checkpoint, a pretrain job's backbone) go through the queue.
    forked = any(t.get("fork") or t.get("needs") for t in tasks)
    _LIMIT = _Limit(res, concurrent, pretrain)
    _QUEUE = ForkQueue(tasks) if forked else None
    if _QUEUE is not None:
        _QUEUE.limit = _LIMIT.current()
    trainable = tune.with_resources(trainable or run_trial, trial_resources(res))
    exp_dir = Path(sweep_dir) / "tune"
    if tune.Tuner.can_restore(str(exp_dir)):
        logger.info("restoring the sweep's Tune experiment from %s", exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        names = {"trial_name_creator": _trial_name, "trial_dirname_creator": _trial_name}
        if forked:
            # num_samples=-1: as many as the searcher hands out, until it says FINISHED. No
            # max_concurrent_trials: its ConcurrencyLimiter would persist live-trial ids a killed driver
            # can leave stale; the queue bounds the trials running or waiting itself (`ForkQueue.limit`,
            # re-read from the cluster as nodes leave or join), and the gang's resources bound them anyway.
            kwargs: dict[str, Any] = {"tune_config": tune.TuneConfig(search_alg=ForkSearcher(), num_samples=-1,
                                                                     reuse_actors=True, **names)}
        else:
            kwargs = {"param_space": {"trial": tune.grid_search(tasks)},
                      "tune_config": tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True, **names)}
        tuner = tune.Tuner(
            trainable,
            run_config=tune.RunConfig(
                name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[ForwardToMonitor()],
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # Keep every (tiny, pointer-only) Tune checkpoint: with num_to_keep the driver deletes
                # older ones between its experiment-state snapshots, and a driver killed in between
                # leaves a state that names a deleted checkpoint, which Tune then cannot restore.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
            **kwargs,
        )
    tuner.fit()


class _Limit:
    """How many gangs the cluster holds now, re-read every LIMIT_TTL_S (nodes leave and join) and
    whenever a pretrain job ends (a running job's resources are not there for trials)."""

    def __init__(self, res: Resources, first: int, pretrain: PretrainJobs | None = None):
        self.res, self.value, self.at, self.pretrain = res, first, None, pretrain
        self.jobs = -1  # pretrain jobs running at the last count

    def current(self) -> int:
        if self.pretrain is not None:
            self.pretrain.poll()
        held = self.pretrain.held() if self.pretrain is not None else []
        fresh = self.at is not None and time.monotonic() - self.at < LIMIT_TTL_S
        if fresh and len(held) == self.jobs:
            return self.value
        self.at, self.jobs = time.monotonic(), len(held)
        n = gangs_that_fit(gang_bundles(self.res), _without(node_resources(), held), self.res.one_node)
        if n != self.value:
            why = f" ({len(held)} pretrain job(s) running)" if held else ""
            logger.info("at most %d trial(s) at a time now%s (was %d)", n, why, self.value)
            self.value = n
        return n


def _without(nodes: list[dict[str, float]], held: list[dict[str, float]]) -> list[dict[str, float]]:
    """The nodes' resources less `held` (each bundle taken from the first node that has it)."""
    free = [dict(n) for n in nodes]
    for bundle in held:
        node = next((f for f in free if all(f.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
        for k, v in (bundle.items() if node is not None else ()):
            node[k] = node.get(k, 0.0) - v
    return free


class ForkSearcher(Searcher):
    """Stateless (picklable) shim: Tune's "next trial?" -> this process's ForkQueue."""

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        from orchestrator.fork import FINISHED

        if _QUEUE is None:
            return None
        task = _QUEUE.next()
        if task == FINISHED:
            return Searcher.FINISHED
        return None if task is None else {"trial": task}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the queue reads trial states from Tune's trial list (ForwardToMonitor.on_step_begin)

    # Nothing to persist: the queue is rebuilt from the spec and Tune's restored trial list.
    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text("{}")

    def restore(self, checkpoint_path: str) -> None:
        pass


class ForwardToMonitor(tune.Callback):
    """Stateless (picklable) shim: Tune events -> this process's SweepMonitor."""

    @staticmethod
    def _tid(trial) -> str:
        return trial.config["trial"]["trial_id"]

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
        limit = _LIMIT.current() if _LIMIT is not None else None  # logs when the cluster changed
        if _QUEUE is not None:  # before Tune asks the searcher for more trials, in the same step
            _QUEUE.sync((t.config["trial"]["trial_id"], t.status) for t in trials if "trial" in t.config)
            _QUEUE.limit = limit
            if _LIMIT is not None and _LIMIT.pretrain is not None:
                _QUEUE.failed_jobs = set(_LIMIT.pretrain.failed)

    def on_step_end(self, iteration, trials, **info):
        if _MONITOR is not None:
            _MONITOR.tick()


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text() if path else ""
    except OSError:
        return ""
