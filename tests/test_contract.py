"""Issue 23's contract, counted (`tests/contract_counts.py` prints the same numbers)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from tests.contract_counts import REPO, driver_modules_in_worker, folder_file_names, metrics_parsers, task_key_reads


def test_no_string_key_reads_of_task_dicts_in_the_orchestrator():
    assert task_key_reads() == []


def test_only_trial_dir_and_checkpoint_spell_a_trial_folder_file():
    assert folder_file_names() == []


def test_one_parser_of_metrics_jsonl():
    assert [p.split()[-1] for p in metrics_parsers()] == ["parse_metric_rows"]


def test_a_trial_process_loads_no_driver_module():
    assert driver_modules_in_worker() == []


def test_the_counters_see_what_they_count(tmp_path, monkeypatch):
    """Each count finds a planted offender (a count that cannot fail proves nothing)."""
    import tests.contract_counts as cc

    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "bad.py").write_text('"""metrics.jsonl in a docstring is fine."""\nimport json\n\n\n'
                                'def f(task, line):\n    open(task["config"] + "/final_metrics.json")\n'
                                '    return json.loads(line)["step"]\n')
    monkeypatch.setattr(cc, "REPO", tmp_path)
    assert len(cc.task_key_reads()) == 1
    assert cc.folder_file_names(("orchestrator",)) == []  # "/final_metrics.json" is a path, not the name
    (pkg / "bad.py").write_text('import json\n\n\ndef f(d):\n    d / "metrics.jsonl"\n'
                                '    return json.loads(d)["step"]\n')
    assert len(cc.folder_file_names(("orchestrator",))) == 1 and len(cc.metrics_parsers(("orchestrator",))) == 1


@pytest.mark.slow
def test_config_validations_per_task_during_run(tmp_path):
    """At most 2 on the driver (expand, bind) and 1 on the worker per attempt, counted in each process
    by the tests' sitecustomize seam (tests/plugins/count_site)."""
    from tests.orchestrator.conftest import auth_disabled, cli, start_node, stop_node, tiny_spec, write_spec

    grid = {"init": ["random"], "data": ["all", 8], "schedule": ["1x", "2x"], "backbone": ["R18"]}
    spec = write_spec(tmp_path, tiny_spec(tmp_path, grid=grid, exclude=[{"data": 8, "schedule": "2x"}]))
    counts = tmp_path / "counts"
    counts.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "plugins" / "count_site")]),
           "ORCHESTRATOR_COUNT_VALIDATIONS": str(counts)}
    with auth_disabled():
        node, address = start_node(tmp_path / "head.log")
        try:
            out = cli("run", str(spec), "--no-view", env={**env, "RAY_ADDRESS": address})
        finally:
            stop_node(node)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for f in counts.glob("*.jsonl") for line in f.read_text().splitlines()]
    seen = Counter((r["role"], r["task"]) for r in rows)
    trials = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "trials").iterdir())
    assert trials == ["random-8-1x-R18", "random-all-1x-R18", "random-all-2x-R18", "random-all-trunk-R18"]
    print({f"{role} {task}": n for (role, task), n in sorted(seen.items())})
    for task in trials:
        attempts = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "trials" / task / "attempts.jsonl")
                    .read_text().splitlines()]
        assert 1 <= seen[("driver", task)] <= 2, (task, seen)
        assert seen[("worker", task)] == len([a for a in attempts if "start_iter" in a]) == 1, (task, seen)
    # Besides: the spec's check of its base config, once per sweep (not a task's).
    assert {task for _, task in seen} - set(trials) <= {"trial"}, seen
