"""The CLI's refusals: one line on stderr, exit code 2, nothing created or launched; and `status`."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main
from orchestrator.sweep.expand import expand
from orchestrator.sweep.spec import parse_spec
from orchestrator.state.folder import create_sweep, write_json
from tests.orchestrator.conftest import tiny_spec, write_spec


def _refused(tmp_path, capsys, spec: dict, command: str = "run") -> str:
    path = write_spec(tmp_path, spec)
    code = main([command, str(path), "--no-view"] if command != "plan" else [command, str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    message = [line for line in err if "error:" in line]
    assert len(message) == 1, err
    assert not (tmp_path / "runs").exists(), "a refused run must not create the sweep"
    assert not (tmp_path / "mlflow.db").exists(), "a refused run must not touch MLflow"
    return message[0]


@pytest.mark.parametrize("change, needle", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"retry__max_failures": "twice"}, "retry.max_failures"),
    ({"grid__schedule": []}, "grid.schedule: axis has no values"),
    ({"grid__backbone": ["R152"]}, "unknown backbone 'R152'"),
    ({"grid__data": ["all", "all"]}, "grid.data[1]: 'all' repeats grid.data[0]"),
])
def test_bad_spec_refused(tmp_path, capsys, change, needle):
    for command in ("plan", "run"):
        assert needle in _refused(tmp_path, capsys, tiny_spec(tmp_path, **change), command)


def test_missing_dataset_refused(tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    spec["dataset"].pop("generate")
    msg = _refused(tmp_path, capsys, spec)
    assert "dataset not found" in msg and "instances_train.json" in msg


def test_unreachable_ray_refused(tmp_path, capsys):
    msg = _refused(tmp_path, capsys, tiny_spec(tmp_path, ray_address="127.0.0.1:1"))
    assert "ray_address 127.0.0.1:1: cannot connect" in msg
    import ray

    assert not ray.is_initialized()


def test_unreachable_mlflow_refused(tmp_path, capsys):
    msg = _refused(tmp_path, capsys, tiny_spec(tmp_path, tracking_uri="http://127.0.0.1:1"))
    assert "tracking_uri http://127.0.0.1:1: MLflow server unreachable" in msg
    msg = _refused(tmp_path, capsys, tiny_spec(tmp_path, tracking_uri=f"sqlite:///{tmp_path}/no/such/dir/m.db"))
    assert "does not exist" in msg


def test_changed_spec_refused(tmp_path, capsys):
    old = tiny_spec(tmp_path)
    exp = expand(parse_spec(old))
    sweep = tmp_path / "runs" / "tiny"
    create_sweep(sweep, exp, "old spec\n", "v0")
    new = tiny_spec(tmp_path, base__optim__base_lr=0.03)
    path = write_spec(tmp_path, new)
    assert main(["run", str(path), "--no-view"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "was started from a different spec" in err and "optim.base_lr default -> 0.03 (2 trials)" in err
    assert "name: tiny-v2" in err
    assert not (tmp_path / "mlflow.db").exists() and not (sweep / "tune").exists()
    # Adding a grid value is a change too, and says which trials appear.
    path = write_spec(tmp_path, tiny_spec(tmp_path, grid__data=["all", 8, 4]))
    assert main(["resume", str(path), "--no-view"]) == 2
    assert "1 trials added (random-4-1x-R18)" in capsys.readouterr().err


def test_status_without_ray(tmp_path, capsys):
    exp = expand(parse_spec(tiny_spec(tmp_path)))
    sweep = tmp_path / "runs" / "tiny"
    create_sweep(sweep, exp, "spec\n", "v0")
    done, half = exp.trials
    write_json(sweep / "state.json", {"driver": {"pid": 999999999, "host": "elsewhere-host-x", "started": 1.0,
                                                 "updated": 2.0, "finished": 3.0, "status": "KILLED"},
                                      "trials": {done.trial_id: {"status": "RUNNING", "attempts": 1}}})
    d = sweep / "trials" / done.name
    d.mkdir(parents=True)
    (d / "final_metrics.json").write_text(json.dumps({"bbox/AP": 0.25, "segm/AP": 0.2, "iteration": 6}))
    h = sweep / "trials" / half.name
    h.mkdir(parents=True)
    (h / "metrics.jsonl").write_text(json.dumps({"step": 3, "bbox/AP": 0.1}) + "\n")
    assert main(["status", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "FINISHED" in out and "6/6" in out and "25.0" in out
    assert "3/6" in out and "10.0" in out
    assert "total: 2 trials" in out
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "spec file not found" in capsys.readouterr().err
