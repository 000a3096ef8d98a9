"""Preemption with notice on a real local Ray node (3 CPUs, 2 declared GPUs; trials on CPU, gloo).

One 2-worker gang trial (`gpus_per_trial: 2`) with `retry.max_failures: 0`: one of its gang workers
gets SIGTERM mid-trial. The gang stops at one iteration with that iteration's checkpoint, the trial
is rescheduled without spending the failure budget, resumes into the same MLflow run, and ends
exactly where an uninterrupted 2-rank run of the same config ends (run here with the trainer alone).
A driver SIGTERMed mid-sweep stops cleanly and `resume` finishes the sweep. What each test measured
is printed as one `preemption:` line (pytest -s).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.orchestrator.conftest import auth_disabled, cli, kill_node, start_node, stop_node, tiny_spec, write_spec
from tests.orchestrator.sweep_utils import (attempts, check_children, duplicate_points, mlflow_contents,
                                            start_driver, uninterrupted_run, wait_for)
from tests.plugins.faults import FAULTS

pytestmark = pytest.mark.slow

TRIAL = "random-all-2x-R18"  # 12 iterations, evaluations and checkpoints every 3
GRID = {"init": ["random"], "data": ["all"], "schedule": ["2x"], "backbone": ["R18"]}
REFERENCE: dict = {}


@pytest.fixture(scope="module")
def gpu_node(tmp_path_factory):
    """One Ray node with 3 CPUs and 2 logical GPUs: one 2-worker gang fits."""
    logs = tmp_path_factory.mktemp("ray")
    with auth_disabled():
        head, address = start_node(logs / "head.log", num_cpus=3, num_gpus=2)
        try:
            yield address, head.pid
        finally:
            stop_node(head)


def _spec(tmp: Path, name: str) -> Path:
    spec = tiny_spec(tmp, name=name, grid=GRID, resources={"cpus_per_trial": 2, "gpus_per_trial": 2},
                     retry={"max_failures": 0}, base__optim__batch_size=2, base__runtime__log_period=1)
    return write_spec(tmp, spec, f"{name}.yaml")


def _steps(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


def _reference(trial: Path, tmp: Path) -> dict:
    """The same trial config trained uninterrupted by 2 gloo ranks of the trainer alone (once per module)."""
    if not REFERENCE:
        REFERENCE.update(uninterrupted_run(trial, tmp / "reference"))
    return REFERENCE


def _gang_worker_pids(session: int) -> list[int]:
    """The gang workers' processes of this test's node (its `ray start` session; other clusters may run here)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session \
                    and b"ray::GangWorker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _check_result(tmp: Path, name: str, trial: Path) -> dict:
    """One FINISHED child run with every point once, and the uninterrupted run's final metrics and curve."""
    ml = mlflow_contents(tmp, name)
    check_children(ml, {TRIAL: [3, 6, 9, 12]})
    assert duplicate_points(tmp) == []
    assert ml["history"][TRIAL]["train/loss"] == list(range(1, 13))  # none missing, none twice
    ref = _reference(trial, tmp)
    final = json.loads((trial / "final_metrics.json").read_text())
    assert final == ref["final"]
    assert (trial / "metrics.jsonl").read_text().splitlines() == ref["rows"]
    return final


def _preempt(tmp: Path, spec: Path, address: str, notice: Callable[[Path], None]) -> tuple[int, float, list, list]:
    """Run the sweep of `spec`; once its trial logged 4 steps, `notice(trial folder)`; the sweep must finish.
    Returns (step seen before the notice, when it was sent, the preempted rows, the attempts' start rows)."""
    log, trial = tmp / f"{spec.stem}.log", tmp / "runs" / spec.stem / "trials" / TRIAL
    driver = start_driver(["run", str(spec), "--no-view"], log,
                          {"RAY_ADDRESS": address, **FAULTS, "ORCHESTRATOR_DELAY": f"{TRIAL}@0.3"})
    try:
        wait_for(driver, lambda: len(_steps(trial)) >= 4, log)
        seen, sent = max(_steps(trial)), time.time()
        notice(trial)
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    rows = attempts(trial.parents[1], TRIAL)
    return seen, sent, [r for r in rows if "preempted_at" in r], [r for r in rows if "start_iter" in r]


def test_sigterm_to_one_gang_worker_is_a_preemption_not_a_failure(tmp_path, gpu_node):
    address, session = gpu_node
    trial = tmp_path / "runs" / "notice" / "trials" / TRIAL

    def sigterm_rank_1(trial: Path) -> None:
        rank0 = attempts(trial.parents[1], TRIAL)[0]["pid"]
        others = [p for p in _gang_worker_pids(session) if p != rank0]
        assert len(others) == 1, others
        os.kill(others[0], signal.SIGTERM)  # rank 1 alone gets the notice

    seen, sent, cut, starts = _preempt(tmp_path, _spec(tmp_path, "notice"), address, sigterm_rank_1)
    assert len(cut) == 1 and len(starts) == 2, (cut, starts)
    at = cut[0]["preempted_at"]
    assert seen <= at <= seen + 1 and cut[0]["reason"] == f"preempted at iteration {at}", (seen, cut)
    assert starts[1]["start_iter"] == at and starts[0]["run_id"] == starts[1]["run_id"], starts
    took = cut[0]["time"] - sent
    state = json.loads((trial.parents[1] / "state.json").read_text())["trials"]
    row = next(r for r in state.values() if r["name"] == TRIAL)
    assert row["status"] == "FINISHED" and row["preemptions"] == 1 and row["attempts"] == 2, row
    status = cli("status", str(trial.parents[1]))
    assert status.returncode == 0 and f"~ {TRIAL}: preempted 1x, last at iteration {at}" in status.stdout
    final = _check_result(tmp_path, "notice", trial)
    print(f"preemption: gang rank 1 SIGTERMed at iteration >= {seen}; both ranks stopped at {at} (checkpoint "
          f"{took:.1f} s after the signal), 0 iterations lost; max_failures 0, trial resumed from {at} into the "
          f"same MLflow run; box AP {final.get('bbox/AP')} equals the uninterrupted run's; duplicates 0")


def test_driver_sigterm_stops_cleanly_and_resume_finishes(tmp_path, gpu_node):
    address = gpu_node[0]
    spec, log = _spec(tmp_path, "driver"), tmp_path / "driver.log"
    trial = tmp_path / "runs" / "driver" / "trials" / TRIAL
    driver = start_driver(["run", str(spec), "--no-view"], log,
                          {"RAY_ADDRESS": address, **FAULTS, "ORCHESTRATOR_DELAY": f"{TRIAL}@0.3"})
    try:
        wait_for(driver, lambda: len(_steps(trial)) >= 4, log)
        driver.send_signal(signal.SIGTERM)
        sent = time.time()
        code = driver.wait(timeout=300)
        took = time.time() - sent
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    text = log.read_text()
    assert code == 128 + signal.SIGTERM and "resume` continues the sweep" in text, text[-3000:]
    status = cli("status", str(trial.parents[1]))
    assert "driver not running (resume with" in status.stdout, status.stdout
    again = cli("resume", str(spec), env={"RAY_ADDRESS": address}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    final = _check_result(tmp_path, "driver", trial)
    print(f"preemption: driver SIGTERMed at iteration {max(_steps(trial)[:4])}+; exit {code} after {took:.1f} s; "
          f"resume finished the sweep; box AP {final.get('bbox/AP')} equals the uninterrupted run's")


def test_node_drained_for_preemption_gives_the_same_notice(tmp_path, gpu_node):
    """The gang runs on a second node (the head's GPUs held by the test); that node is drained with
    `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`: the gang stops at one iteration with its
    checkpoint and the trial resumes on the head, without spending `max_failures: 0`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    address = gpu_node[0]
    trial = tmp_path / "runs" / "drain" / "trials" / TRIAL

    def drain_its_node(trial: Path) -> None:
        node = json.loads((trial / "gang.jsonl").read_text().splitlines()[0])["nodes"][0]
        drained = _ray_cli("drain-node", "--address", address, "--node-id", node, "--reason",
                          "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "test: spot reclaim",
                          "--deadline-remaining-seconds", "60")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        deadline = time.time() + 120
        while time.time() < deadline and not any("preempted_at" in r for r in attempts(trial.parents[1], TRIAL)):
            time.sleep(0.2)
        ray.kill(hold)  # the head's GPUs go back: the gang fits there now

    with auth_disabled():
        worker = start_node(tmp_path / "worker.log", head=address, num_cpus=3, num_gpus=2)[0]
        ray.init(address=address, log_to_driver=False, configure_logging=False, namespace="drain-test")
        try:
            head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
            hold = ray.remote(num_cpus=0, num_gpus=2)(_Hold).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
            ray.get(hold.ready.remote(), timeout=120)  # so the gang starts on the worker node
            seen, sent, cut, starts = _preempt(tmp_path, _spec(tmp_path, "drain"), address, drain_its_node)
        finally:
            ray.shutdown()
            kill_node(worker)
    assert len(cut) == 1 and "drained" in cut[0]["notice"] and len(starts) == 2, (cut, starts)
    at = cut[0]["preempted_at"]
    # No finished step lost (it resumes where it stopped); the notice (`ray drain-node` itself takes seconds
    # to run here, then a 2 s poll) and the checkpoint came well within the drain's 60 s deadline.
    assert seen <= at and starts[1]["start_iter"] == at, (seen, cut, starts)
    took = cut[0]["time"] - sent
    assert took < 60, took
    gangs = [json.loads(x) for x in (trial / "gang.jsonl").read_text().splitlines() if "gang_start" in x]
    assert gangs[0]["nodes"] != gangs[-1]["nodes"], gangs  # resumed on the head
    final = _check_result(tmp_path, "drain", trial)
    print(f"preemption: node drained (PREEMPTION, 60 s deadline) at iteration >= {seen}; gang stopped at {at} "
          f"{took:.1f} s after `ray drain-node` started ({cut[0]['notice']}); resumed on the head from {at}; "
          f"box AP {final.get('bbox/AP')} equals the uninterrupted run's")


class _Hold:
    def ready(self) -> bool:
        return True


def _ray_cli(*args: str):
    import subprocess

    from tests.orchestrator.conftest import PYTHON

    return subprocess.run([str(Path(PYTHON).parent / "ray"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def test_sigterm_to_a_single_worker_trial_process(tmp_path, gpu_node):
    """A one-process trial (no gang): the SIGTERM reaches Tune's trial actor itself, whose training runs in
    a thread of it; the notice still stops it at a step's end, and it resumes to the uninterrupted end."""
    from trainer.config import build_config
    from trainer.engine.train_loop import train
    from trainer.engine.reporters import JsonlReporter

    spec = tiny_spec(tmp_path, name="single", grid=GRID, retry={"max_failures": 0}, base__optim__batch_size=2,
                     base__runtime__log_period=1)
    trial = tmp_path / "runs" / "single" / "trials" / TRIAL

    def sigterm_trial_process(trial: Path) -> None:
        os.kill(attempts(trial.parents[1], TRIAL)[0]["pid"], signal.SIGTERM)  # Tune's actor for the trial

    seen, _, cut, starts = _preempt(tmp_path, write_spec(tmp_path, spec, "single.yaml"), gpu_node[0],
                                    sigterm_trial_process)
    assert len(cut) == 1 and cut[0]["notice"] == "SIGTERM" and len(starts) == 2, (cut, starts)
    at = cut[0]["preempted_at"]
    assert seen <= at <= seen + 1 and starts[1]["start_iter"] == at, (seen, cut, starts)
    ml = mlflow_contents(tmp_path, "single")
    check_children(ml, {TRIAL: [3, 6, 9, 12]})
    assert duplicate_points(tmp_path) == [] and ml["history"][TRIAL]["train/loss"] == list(range(1, 13))
    cfg = yaml.safe_load((trial / "config.yaml").read_text())
    cfg["runtime"]["output_dir"] = str(tmp_path / "reference")
    train(build_config(cfg), reporters=[JsonlReporter()])
    final = json.loads((trial / "final_metrics.json").read_text())
    assert final == json.loads((tmp_path / "reference" / "final_metrics.json").read_text())
    assert (trial / "metrics.jsonl").read_text() == (tmp_path / "reference" / "metrics.jsonl").read_text()
    print(f"preemption: single-worker trial process SIGTERMed at iteration >= {seen}; stopped at {at}, resumed "
          "from there; final metrics and curve equal the uninterrupted run's")
