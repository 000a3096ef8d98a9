"""`run` / `resume`: validate everything, then start or resume the sweep on Ray with MLflow tracking.

Order matters: every check that can refuse (spec, trial configs, changed spec, dataset, MLflow URI,
Ray address) runs before anything is created or launched. Then: the sweep folder, the dataset (if
the spec generates it), the Ray connection, the pretrain jobs (while a thread makes the MLflow parent
run and one child run per trial), and the Tune run of the trials, longest first (it keeps the tail short).
With schedule forking the trunks run as tasks too (no MLflow run of their own), and each branch is
released to Tune once its trunk's checkpoint at its fork point is on disk (`orchestrator.fork`).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import state as st
from orchestrator.dataset import check_defects, generate, needs_generation
from orchestrator.errors import OrchestratorError, SweepNotFoundError
from orchestrator.expand import Expansion, backbone_file, bind_config, bind_pretrain, check_weight_files, expand
from orchestrator.fork import Trunk, checkpoint_file, priorities
from orchestrator.monitor import LiveView, SweepMonitor
from orchestrator.spec import SweepSpec, load_spec
from trainer.config import config_to_dict, flatten
from trainer.report import hms as _hms

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
FORWARD_ENV = ("ORCHESTRATOR_FAIL_ONCE", "ORCHESTRATOR_DELAY")  # test hooks the trials must see


@dataclass
class Prepared:
    spec: SweepSpec
    exp: Expansion
    sweep_dir: Path
    record: dict[str, Any] | None
    spec_text: str
    tracking_uri: str
    address: str | None


def prepare(spec_path: Path, storage: Path | None = None) -> Prepared:
    """All refusals, nothing created: spec, trials, identity, dataset, MLflow, Ray address."""
    from orchestrator.ray_backend import check_address, resolve_address
    from orchestrator.tracking import check_reachable, resolve_uri

    spec = load_spec(spec_path)
    if storage is not None:
        spec = spec.model_copy(update={"storage_path": storage})
    exp = expand(spec)
    check_weight_files(exp.trials)  # ImageNet weight files: plan costs a grid without them, run refuses
    sweep_dir = st.sweep_dir_for(spec.storage_path, spec.name)
    record = st.read_record(sweep_dir)
    if record is not None:
        st.ensure_same_spec(sweep_dir, record, exp)
        driver = st.read_state(sweep_dir).get("driver", {})
        if st.driver_alive(driver):
            raise OrchestratorError(f"sweep {spec.name!r} is being run by pid {driver['pid']} on {driver['host']}; "
                                    f"watch it with: python -m orchestrator status {sweep_dir}")
    needs_generation(spec.dataset, need_classification=bool(exp.pretrain))
    uri = resolve_uri(spec.tracking_uri)
    check_reachable(uri)
    address = resolve_address(spec.ray_address)
    check_address(address)
    return Prepared(spec, exp, sweep_dir, record, Path(spec_path).read_text(), uri, address)


def run(spec_path: Path, *, storage: Path | None = None, must_exist: bool = False, view: bool = True) -> int:
    """Start or resume a sweep; returns 0 when every trial finished, 1 otherwise."""
    from orchestrator import ray_backend as rb
    from orchestrator.tracking import is_server

    p = prepare(spec_path, storage)
    if must_exist and p.record is None:
        raise SweepNotFoundError(f"sweep {p.spec.name!r} has not been started; use: python -m orchestrator run "
                                 f"{spec_path}")
    spec, exp, sweep_dir = p.spec, p.exp, p.sweep_dir
    t0 = time.time()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.update({k: os.environ[k] for k in FORWARD_ENV if k in os.environ})
    rb.connect(p.address, env)
    concurrent = rb.max_concurrent(spec.resources, rb.node_resources())  # a trial that never fits: refused here
    record = p.record or st.create_sweep(sweep_dir, exp, p.spec_text, st.code_version())
    logger.info("%s sweep %s (%d trials, spec hash %s) in %s", "resuming" if p.record else "starting", spec.name,
                len(exp.trials), exp.spec_hash, sweep_dir)
    if needs_generation(spec.dataset, need_classification=bool(exp.pretrain)):
        generate(spec.dataset)
    check_defects(exp.trials)  # dataset defects: one line before any trial starts
    _check_storage(exp, sweep_dir)  # every node sees the sweep folder, dataset and weights, or nothing starts
    # MLflow's runs are made while the pretrain jobs train: a fresh store's migrations and one child
    # run (with all its params) per trial take seconds to a minute on a big grid.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-setup") as pool:
        opened = pool.submit(_open_tracking, p, record)
        backbones = _pretrain(exp, sweep_dir, spec.retry.max_failures)
        tracker, run_ids = opened.result()
    tasks = _tasks(exp, sweep_dir, backbones, run_ids, p.tracking_uri if is_server(p.tracking_uri) else None)
    monitor = SweepMonitor(sweep_dir, record, run_ids, tracker, log_metrics=not is_server(p.tracking_uri),
                           view=LiveView(enabled=view))
    logger.info("running %d trials, at most %d at a time; MLflow: %s (experiment %r)", len(tasks), concurrent,
                p.tracking_uri, spec.name)
    finished = False
    try:
        rb.run_tune(sweep_dir, tasks, spec.resources, spec.retry.max_failures, concurrent, monitor)
        finished = True
    finally:
        status = monitor.close(finished)
        tracker.finish(status if finished else "KILLED")
    logger.info("sweep %s %s in %s; %d iterations trained (plan: %d)", spec.name, status.lower(),
                _hms(time.time() - t0), st.trained_iterations(sweep_dir, [t["name"] for t in tasks]),
                sum(t["total"] - (t.get("fork") or {}).get("at", 0) for t in tasks))
    return 0 if status == "FINISHED" else 1


def _check_storage(exp: Expansion, sweep_dir: Path) -> None:
    from orchestrator import ray_backend as rb
    from orchestrator.storage import refusal, shared_paths, write_token

    token_path, token = write_token(sweep_dir)
    paths = shared_paths(exp.spec.dataset.root, [t.config for t in [*exp.trials, *exp.forks.trunks]])
    failures = rb.check_nodes(token_path, token, paths)
    if failures:
        raise refusal(failures)
    logger.info("shared storage: every node sees the sweep folder and %s", ", ".join(p for _, p in paths))


def _open_tracking(p: Prepared, record: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """The sweep's parent run and one child run per trial (existing ones are found, not duplicated)."""
    from orchestrator.tracking import SweepTracker

    tracker = SweepTracker(p.tracking_uri, p.spec.name, p.exp.spec_hash, record["code_version"])
    tracker.open_parent(p.spec_text)
    return tracker, _child_runs(tracker, p.exp, p.sweep_dir, record)


def _child_runs(tracker: Any, exp: Expansion, sweep_dir: Path, record: dict[str, Any]) -> dict[str, str]:
    axes = {t["trial_id"]: t["axes"] for t in record["trials"]}
    run_ids = {}
    for trial in exp.trials:
        cfg = bind_config(trial, sweep_dir, {j.name: backbone_file(sweep_dir, j.name) for j in exp.pretrain})
        params = flatten(config_to_dict(cfg))
        tags = None
        if trial.trial_id in exp.forks.branches:  # the trunk its curve comes from up to the fork point
            trunk_id, at = exp.forks.branches[trial.trial_id]
            tags = {"fork.trunk": exp.forks.trunk(trunk_id).name, "fork.trunk_id": trunk_id, "fork.iteration": str(at)}
        run_ids[trial.trial_id] = tracker.child_run(trial.trial_id, trial.name, axes[trial.trial_id], params, tags)
    return run_ids


def _pretrain(exp: Expansion, sweep_dir: Path, retries: int) -> dict[str, Path]:
    from orchestrator.ray_backend import run_pretrain

    files = {j.name: backbone_file(sweep_dir, j.name) for j in exp.pretrain}
    todo = [(j.name, bind_pretrain(j, sweep_dir), j.resources) for j in exp.pretrain
            if not (files[j.name].parent / "done.json").exists()]
    if todo:
        run_pretrain(todo, retries)
    return files


def _tasks(exp: Expansion, sweep_dir: Path, backbones: dict[str, Path], run_ids: dict[str, str],
           direct_uri: str | None) -> list[dict[str, Any]]:
    res = exp.spec.resources
    tasks = []
    outputs = {t.trial_id: str(bind_config(t, sweep_dir, backbones).runtime.output_dir) for t in exp.trials}
    branches_of = {tr.trunk_id: [[outputs[b], at] for b, at in tr.forks.items()] for tr in exp.forks.trunks}
    for trial in [*exp.trials, *exp.forks.trunks]:
        cfg = bind_config(trial, sweep_dir, backbones)
        task = {"trial_id": trial.trial_id, "name": trial.name, "config": config_to_dict(cfg),
                "run_id": run_ids.get(trial.trial_id, ""), "direct_uri": direct_uri, "workers": res.workers,
                "cpus_per_worker": res.cpus_per_worker, "gpus_per_worker": res.gpus_per_worker,
                "total": _total(cfg), "role": "trial",
                "keep_checkpoints": exp.spec.keep_checkpoints}
        if trial.trial_id in exp.forks.branches:
            trunk_id, at = exp.forks.branches[trial.trial_id]
            trunk = exp.forks.trunk(trunk_id)
            source = checkpoint_file(st.trial_dir(sweep_dir, trunk.name), at)
            task.update(role="branch", fork={"trunk_id": trunk_id, "trunk": trunk.name, "at": at, "checkpoint": str(source),
                                             "branches": branches_of[trunk_id]})
        elif isinstance(trial, Trunk):
            task.update(role="trunk", stop_after=trial.stop, total=trial.stop, branches=branches_of[trial.trunk_id])
        tasks.append(task)
    # Longest (critical path) first: the last tasks to start are the short ones, so the sweep ends sooner.
    prio = priorities(tasks)
    return sorted(tasks, key=lambda t: -prio[t["trial_id"]])


def _total(cfg) -> int:
    from trainer.schedule import resolve_schedule

    return resolve_schedule(cfg.schedule).total_iters


