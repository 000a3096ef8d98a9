"""`run` / `resume`: validate everything, then start or resume the sweep on Ray with MLflow tracking.

Order matters: every check that can refuse (spec, trial configs, changed spec, dataset, MLflow URI,
Ray address) runs before anything is created or launched. Then: the sweep folder, the dataset (if
the spec generates it), the Ray connection (and the autoscaler's node types, if it has one: a trial
none of them could hold is refused there), the pretrain jobs (Ray tasks: they train beside the
trials that do not need their backbone, while those that do wait in the queue), the MLflow parent
run and one child run per trial, and the Tune run of the trials, longest first (it keeps the tail
short), on the nodes alive now and those that join (`orchestrator.execution.capacity`).
With schedule forking the trunks run as tasks too (no MLflow run of their own), and each branch is
released to Tune once its trunk's checkpoint at its fork point is on disk (`orchestrator.execution.release`).
Each trial, trunk and branch becomes one `orchestrator.worker.task.Task` here (`build_tasks`), its config
bound and validated once (`bound_configs`); sweep.json holds their plans (`state.task_plans`).
A SIGTERM to the driver (its own node preempted, a SLURM job's end, `kill`) stops it as Ctrl-C does
(Tune saves its state and stops the trials), then it ends with `SweepInterrupted`: `resume` continues.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import orchestrator.state.folder as st
from orchestrator.sweep.dataset import check_defects, generate, needs_generation
from orchestrator.state.driver_log import sweep_log
from orchestrator.errors import (DatasetMissingError, InputsMissingError, OrchestratorError, SweepInterrupted,
                                 SweepNotFoundError)
from orchestrator.sweep.expand import Expansion, backbone_file, bind_config, bind_pretrain, expand, missing_weight_files
from orchestrator.views.monitor import LiveView, SweepMonitor
from orchestrator.execution.release import priorities
from orchestrator.tracking.run_notes import sweep_note, sweep_params
from orchestrator.sweep.spec import SweepSpec, load_spec
from orchestrator.worker.task import StoreRef, Task
from orchestrator.views.view import duration
from trainer.config import TrainConfig, config_to_dict, flatten

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
FORWARD_PREFIX = "ORCHESTRATOR_"  # the driver's ORCHESTRATOR_* variables reach every trial (plugins' settings)


@dataclass
class Prepared:
    spec: SweepSpec
    exp: Expansion
    sweep_dir: Path
    record: dict[str, Any] | None
    spec_text: str
    tracking_uri: str
    address: str | None
    sets: list[str]
    mirror: Any = None  # an object-store sweep's `orchestrator.state.mirror.SweepMirror` (driver side)


def prepare(spec_path: Path, storage: Path | str | None = None, sets: list[str] | None = None) -> Prepared:
    """All refusals, nothing created: spec, trials, identity, inputs, MLflow, Ray address.

    Without `sets`, an existing sweep's stored ones are reapplied (`orchestrator.sweep.sets`)."""
    from orchestrator.execution.ray_backend import check_address, resolve_address
    from orchestrator.tracking.mlflow_runs import check_reachable, resolve_uri

    spec = _load(spec_path, storage, sets or [])
    sweep_dir = st.sweep_dir_for(spec.storage_path, spec.name, spec.local_cache)
    mirror = _pull_mirror(spec, sweep_dir)
    record = st.read_record(sweep_dir)
    if not sets and record is not None and record.get("sets"):
        sets = list(record["sets"])
        spec = _load(spec_path, storage, sets)
        logger.info("reapplying the sweep's --set %s", " ".join(sets))
    exp = expand(spec)
    if record is not None:
        st.ensure_same_spec(sweep_dir, record, exp)
        driver = st.read_state(sweep_dir).get("driver", {})
        if st.driver_alive(driver):
            raise OrchestratorError(f"sweep {spec.name!r} is being run by pid {driver['pid']} on {driver['host']}; "
                                    f"watch it with: python -m orchestrator status {sweep_dir}")
    _check_inputs(exp)
    uri = resolve_uri(spec.tracking_uri)
    check_reachable(uri)
    address = resolve_address(spec.ray_address)
    check_address(address)
    return Prepared(spec, exp, sweep_dir, record, Path(spec_path).read_text(), uri, address, list(sets or []),
                    mirror)


def _load(spec_path: Path, storage: Path | str | None, sets: list[str]) -> SweepSpec:
    spec = load_spec(spec_path, sets)
    if storage is None:
        return spec
    try:  # validated again: an object store refuses what it cannot hold yet (SweepSpec._storage)
        return SweepSpec.model_validate({**dict(spec), "storage_path": storage})
    except ValueError as exc:
        raise OrchestratorError(f"--storage {storage}: {str(exc).splitlines()[-1].strip()}") from None


def _pull_mirror(spec: SweepSpec, sweep_dir: Path) -> Any:
    """An object-store sweep's mirror with the store's top-level files (a sweep started elsewhere, or
    on a cluster that is gone, resumes from them), or None on shared storage."""
    if spec.store_uri is None:
        return None
    copy = st.mirror(spec.store_uri, sweep_dir)
    st.pull_root(copy)
    return copy


def _check_inputs(exp: Expansion) -> None:
    """The dataset and every weights file, named in one refusal (fixing one should not reveal the next)."""
    missing = missing_weight_files(exp.trials)
    try:
        needs_generation(exp.spec.dataset, need_classification=bool(exp.pretrain))
    except DatasetMissingError as exc:
        missing.insert(0, str(exc))
    if len(missing) == 1:
        raise InputsMissingError(missing[0])
    if missing:
        raise InputsMissingError(f"{len(missing)} inputs missing: " + " | ".join(
            f"({i}) {line}" for i, line in enumerate(missing, 1)))


def run(spec_path: Path, *, storage: Path | str | None = None, must_exist: bool = False, view: bool = True,
        sets: list[str] | None = None) -> int:
    """Start or resume a sweep; returns 0 when every trial finished, 1 otherwise."""
    import orchestrator.execution.autoscale as autoscale
    import orchestrator.execution.ray_backend as rb
    from orchestrator.execution.capacity import Capacity, most_at_once
    from orchestrator.tracking.metric_sync import MetricSync

    p = prepare(spec_path, storage, sets)
    if must_exist and p.record is None:
        raise SweepNotFoundError(f"sweep {p.spec.name!r} has not been started; use: python -m orchestrator run "
                                 f"{spec_path}")
    spec, exp, sweep_dir = p.spec, p.exp, p.sweep_dir
    t0 = time.time()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.update({k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIX)})
    rb.connect(p.address, env)
    auto = autoscale.node_types()  # None: no autoscaler, the alive nodes are the cluster
    # A trial that never fits (on any node the autoscaler could launch) is refused here.
    concurrent = most_at_once(spec.resources, auto, rb.node_resources())
    record = p.record or st.create_sweep(sweep_dir, exp, p.spec_text, st.code_version(), p.sets)
    if p.mirror is not None:  # the store holds the truth: the driver's files up, the trials' state down
        p.mirror.sync()
    logger.info("%s sweep %s (%d trials, spec hash %s) in %s", "resuming" if p.record else "starting", spec.name,
                len(exp.trials), exp.spec_hash, sweep_dir)
    if needs_generation(spec.dataset, need_classification=bool(exp.pretrain)):
        generate(spec.dataset)
    check_defects(exp.trials)  # dataset defects: one line before any trial starts
    # Every node sees the sweep folder, dataset and weights, or nothing starts; nodes that join are checked too.
    checked, check = _check_storage(exp, sweep_dir, p.mirror)
    # The pretrain jobs train beside the trials that do not need them (those that do wait in the queue
    # for the backbone); MLflow's runs are made meanwhile: a fresh store's migrations and one child
    # run (with all its params) per trial take seconds to a minute on a big grid.
    jobs = _start_pretrain(exp, sweep_dir, spec.retry.max_failures, _store_ref(spec))
    configs = bound_configs(exp, sweep_dir)  # each task's config, validated here once
    tracker, run_ids = _open_tracking(p, record, configs)
    tasks = build_tasks(exp, configs, run_ids, _store_ref(spec))
    if p.mirror is not None:
        p.mirror.start()
    sync = MetricSync(tracker, sweep_dir, record, run_ids, period=spec.tracking.metric_period,
                      final_wait_s=30.0 if p.mirror is not None else 0.0).start()
    monitor = SweepMonitor(sweep_dir, record, sync, view=LiveView(enabled=view))
    capacity = Capacity(spec.resources, checked, check, jobs, auto, concurrent)
    logger.info("running %d trials, at most %d at a time%s; MLflow: %s (experiment %r)", len(tasks), concurrent,
                " once the autoscaler launched the nodes" if auto else "", p.tracking_uri, spec.name)
    finished = False
    try:
        with sweep_log(sweep_dir), _sigterm_as_ctrl_c() as stopped:  # Ray/Tune: full text in SWEEP/driver.log
            rb.run_tune(sweep_dir, tasks, spec.resources, spec.retry.max_failures, concurrent, monitor,
                        pretrain=jobs, capacity=capacity, job_done=lambda job: _done_marker(sweep_dir, job).exists(),
                        store_uri=spec.store_uri)
            if stopped:
                raise SweepInterrupted(stopped[0])
            failed = jobs.wait() if jobs is not None else {}
        finished = True
    finally:
        if p.mirror is not None:
            p.mirror.sync()  # the trials' last pushes, before the metric syncer's last pass
        status = monitor.close(finished)
        tracker.finish(status if finished else "KILLED")
        if p.mirror is not None:
            p.mirror.close()  # state.json and driver.log up
    for name, why in failed.items():
        logger.error("pretrain job %s failed: %s; the trials on its backbone could not run", name, why)
    logger.info("sweep %s %s in %s; %d iterations trained (plan: %d)", spec.name, status.lower(),
                duration(time.time() - t0), st.trained_iterations(sweep_dir, [t.name for t in tasks]),
                sum(t.trained for t in tasks))
    return 0 if status == "FINISHED" else 1


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """While inside, SIGTERM becomes SIGINT, which Tune takes as "stop: save the experiment and end the
    trials" (ray.init installed a SIGTERM handler that would just exit). Yields the signals seen."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def to_sigint(signum: int, frame: Any) -> None:
        seen.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, to_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_storage(exp: Expansion, sweep_dir: Path, mirror: Any = None) -> tuple[set[str], Any]:
    """Check every alive node now; (their ids, the check of nodes that join later)."""
    import orchestrator.execution.ray_backend as rb
    from orchestrator.execution.storage import refusal, shared_paths, write_store_token, write_token

    spec = exp.spec
    token_path, token = write_store_token(mirror.store) if mirror is not None else write_token(sweep_dir)
    scratch = str(st.scratch_dir_for(spec.store_uri, spec.local_cache)) if spec.store_uri else None
    paths = shared_paths(spec.dataset.root, [t.config for t in [*exp.trials, *exp.forks.trunks]])
    alive = set(rb.alive_nodes())
    failures = rb.check_nodes(token_path, token, paths, alive, scratch=scratch)
    if failures:
        raise refusal(failures)
    where = f"the object store {spec.store_uri} (scratch {scratch})" if scratch else "the sweep folder"
    logger.info("storage: every node sees %s and %s", where, ", ".join(p for _, p in paths))
    return alive, lambda nodes: rb.check_nodes(token_path, token, paths, nodes, scratch=scratch)


def _store_ref(spec: SweepSpec) -> StoreRef | None:
    if spec.store_uri is None:
        return None
    return StoreRef(uri=spec.store_uri, scratch=str(st.scratch_dir_for(spec.store_uri, spec.local_cache)),
                    mirror=str(st.sweep_dir_for(spec.storage_path, spec.name, spec.local_cache)))


def _open_tracking(p: Prepared, record: dict[str, Any],
                   configs: dict[str, TrainConfig]) -> tuple[Any, dict[str, str]]:
    """The sweep's parent run and the trials' runs it has already; the others are made as trials start."""
    from orchestrator.tracking.mlflow_runs import SweepTracker

    tracker = SweepTracker(p.tracking_uri, p.spec.name, p.exp.spec_hash, record["code_version"],
                           source="python -m orchestrator run")
    tracker.open_parent(p.spec_text, sweep_params(record), sweep_note(record))
    return tracker, _child_runs(tracker, p.exp, record, configs)


def _child_runs(tracker: Any, exp: Expansion, record: dict[str, Any],
                configs: dict[str, TrainConfig]) -> dict[str, str]:
    """The runs a resumed sweep has; the others are planned, made as their trials start (`MetricSync`)."""
    axes = {t.trial_id: t.axes for t in st.task_rows(record)}
    for trial in exp.trials:
        params = flatten(config_to_dict(configs[trial.trial_id]))
        tags = None
        if trial.trial_id in exp.forks.branches:  # the trunk its curve comes from up to the fork point
            trunk_id, at = exp.forks.branches[trial.trial_id]
            tags = {"fork.trunk": exp.forks.trunk(trunk_id).name, "fork.trunk_id": trunk_id, "fork.iteration": str(at)}
        tracker.plan_child(trial.trial_id, trial.name, axes[trial.trial_id], params, tags)
    return tracker.find_children()


def _start_pretrain(exp: Expansion, sweep_dir: Path, retries: int, store: StoreRef | None = None) -> Any:
    """The pretrain jobs not done yet, started as Ray tasks (an `ray_backend.PretrainJobs`), or None."""
    from orchestrator.execution.ray_backend import PretrainJobs

    todo = [(j.name, bind_pretrain(j, sweep_dir), j.resources) for j in exp.pretrain
            if not _done_marker(sweep_dir, j.name).exists()]
    return PretrainJobs(todo, retries, store.model_dump() if store else None) if todo else None


def _done_marker(sweep_dir: Path, job: str) -> Path:
    """What a finished pretrain job leaves next to its backbone (`trainable.run_pretrain_job`)."""
    return backbone_file(sweep_dir, job).parent / "done.json"


def bound_configs(exp: Expansion, sweep_dir: Path) -> dict[str, TrainConfig]:
    """Task id -> its launch config (`expand.bind_config`): the one validation per task after `expand`."""
    backbones = {j.name: backbone_file(sweep_dir, j.name) for j in exp.pretrain}
    return {t.trial_id: bind_config(t, sweep_dir, backbones) for t in [*exp.trials, *exp.forks.trunks]}


def build_tasks(exp: Expansion, configs: dict[str, TrainConfig], run_ids: dict[str, str],
                store: StoreRef | None = None) -> list[Task]:
    """The sweep's tasks, longest critical path first (the last to start are short, so the sweep ends sooner)."""
    res = exp.spec.resources
    tasks = [Task(**dict(plan), config=configs[plan.trial_id], run_id=run_ids.get(plan.trial_id, ""), store=store,
                  workers=res.workers, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker,
                  keep_checkpoints=exp.spec.keep_checkpoints)
             for plan in st.task_plans(exp)]
    prio = priorities(tasks)
    return sorted(tasks, key=lambda t: -prio[t.trial_id])


