"""`Task`: one shape from the driver to the worker; the older shapes of 990dd5f's sweep.json and Tune dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.sweep.expand import expand
from orchestrator.execution.run import bound_configs, build_tasks
from orchestrator.sweep.spec import parse_spec
from orchestrator.state.folder import make_record
from orchestrator.worker.task import Task, read_plans
from tests.orchestrator.conftest import tiny_spec

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "sweep_990dd5f" / "root" / "runs" / "old"
GRID = {"init": ["random"], "data": ["all", 8], "schedule": ["1x", "2x"], "backbone": ["R18"]}


def _tasks(tmp_path):
    exp = expand(parse_spec(tiny_spec(tmp_path, grid=GRID, exclude=[{"data": 8, "schedule": "2x"}])))
    return exp, build_tasks(exp, bound_configs(exp, tmp_path / "sweep"), {})


def test_a_task_crosses_the_wire_unchanged_and_stays_frozen(tmp_path):
    _, tasks = _tasks(tmp_path)
    by_name = {t.name: t for t in tasks}
    trunk, branch = by_name["random-all-trunk-R18"], by_name["random-all-2x-R18"]
    assert (trunk.role, trunk.stop_after, [b.name for b in trunk.branches]) == (
        "trunk", 8, ["random-all-1x-R18", "random-all-2x-R18"])
    assert branch.fork.at == 8 and branch.fork_checkpoint() == trunk.folder.checkpoint(8)
    assert by_name["random-8-1x-R18"].role == "trial" and by_name["random-8-1x-R18"].fork is None
    for task in tasks:
        wire = json.loads(json.dumps(task.to_wire()))  # what Tune pickles: plain types only
        assert Task.from_wire(wire) == task
    with pytest.raises(ValidationError):
        branch.total = 3  # frozen
    with pytest.raises(ValidationError):
        Task.from_wire({**trunk.to_wire(), "iterations": 8})  # unknown keys are refused


def test_sweep_json_stores_the_plans_the_driver_runs(tmp_path):
    exp, tasks = _tasks(tmp_path)
    plans = read_plans(json.loads(json.dumps(make_record(exp, "name: tiny\n", "src-0"))))
    assert sorted(p.model_dump_json() for p in plans) == sorted(
        p.model_dump_json(include=set(type(plans[0]).model_fields)) for p in tasks)


def test_a_990dd5f_sweep_json_and_its_tune_dicts_still_load():
    record = json.loads((OLD / "sweep.json").read_text())
    assert "total_iters" in record["trials"][0] and "forks" in record["trunks"][0]  # the old shape indeed
    plans = {p.name: p for p in read_plans(record)}
    trunk, branch = plans["random-all-trunk-R18"], plans["random-all-2x-R18"]
    assert (trunk.role, trunk.total, [(b.name, b.at) for b in trunk.branches]) == (
        "trunk", 8, [("random-all-1x-R18", 2), ("random-all-2x-R18", 8)])
    assert (branch.role, branch.total, branch.fork.trunk, branch.fork.at) == ("branch", 12, trunk.name, 8)
    assert plans["random-8-1x-R18"].role == "trial"
    for params in sorted((OLD / "tune").glob("*/params.json")):  # a restored Tune trial hands these to the worker
        old = json.loads(params.read_text())["trial"]
        task = Task.from_wire(old)
        assert (task.trial_id, task.name, task.total, task.run_id) == (old["trial_id"], old["name"], old["total"],
                                                                       old["run_id"])
        assert str(task.config.runtime.output_dir) == old["config"]["runtime"]["output_dir"]
        if old.get("fork"):
            assert str(task.fork_checkpoint()) == old["fork"]["checkpoint"]
            assert [[str(task.folder.sibling(b.name).path), b.at] for b in task.branches] == old["fork"]["branches"]
        if old["role"] == "trunk":
            assert task.stop_after == old["stop_after"]
