"""Inspect and override a sweep before it runs: `plan --show`, `--set`, `--json`; and the progress rows
of `status` (pretrain jobs, a branch waiting for its trunk). No Ray: `run`/`resume` are in
test_sets_ray.py."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.sweep.expand import expand, pretrain_dir
from orchestrator.sweep.spec import parse_spec
from orchestrator.state.folder import create_sweep, write_json
from tests.orchestrator.conftest import tiny_spec, write_spec

FORKED = {"init": ["random"], "data": ["all"], "schedule": ["1x", "2x"], "backbone": ["R18"]}


def _out(capsys, argv: list[str], code: int = 0) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    return captured.out if code == 0 else captured.err


def test_plan_show_prints_the_resolved_trainer_config(tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(tmp_path))
    for which in ("random-8-1x-R18", "1"):
        text = _out(capsys, ["plan", str(path), "--show", which])
        cfg = yaml.safe_load(text)
        assert cfg["data"]["train_images"] == 8 and cfg["model"]["backbone"] == "R18"
        assert cfg["runtime"]["output_dir"] == str(tmp_path / "runs" / "tiny" / "trials" / "random-8-1x-R18")
        assert cfg["data"]["root"] == str(tmp_path / "data")
        assert text.startswith("# random-8-1x-R18 (")
    # The printed config is a valid trainer config: the trainer's own --print-config gives it back.
    (tmp_path / "trial.yaml").write_text(text)
    from trainer.config import load_config

    assert load_config(tmp_path / "trial.yaml").data.train_images == 8
    err = _out(capsys, ["plan", str(path), "--show", "nope"], code=2)
    assert "--show nope: no such trial" in err and "random-all-1x-R18" in err


def test_plan_show_a_trunk(tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(tmp_path, grid=FORKED))
    cfg = yaml.safe_load(_out(capsys, ["plan", str(path), "--show", "T0"]))
    assert cfg["runtime"]["output_dir"].endswith("/trials/random-all-trunk-R18")


@pytest.mark.parametrize("sets", [["optim.base_lr=0.005"], ["optim.base_lr", "0.005"]])
def test_plan_set_a_trainer_key_in_every_trial(tmp_path, capsys, sets):
    path = write_spec(tmp_path, tiny_spec(tmp_path))
    plain = json.loads(_out(capsys, ["plan", str(path), "--json"]))
    changed = json.loads(_out(capsys, ["plan", str(path), "--set", *sets, "--json"]))
    assert changed["spec_hash"] != plain["spec_hash"]  # the trials changed, as the same YAML edit would
    assert [t["name"] for t in changed["trials"]] == [t["name"] for t in plain["trials"]]
    for name in ("random-all-1x-R18", "random-8-1x-R18"):
        cfg = yaml.safe_load(_out(capsys, ["plan", str(path), "--set", *sets, "--show", name]))
        assert cfg["optim"]["base_lr"] == 0.005
    # The same edit made in the file gives the same hash.
    edited = write_spec(tmp_path, tiny_spec(tmp_path, overrides=[{"when": {}, "set": {"optim.base_lr": 0.005}}]),
                        "edited.yaml")
    assert json.loads(_out(capsys, ["plan", str(edited), "--json"]))["spec_hash"] == changed["spec_hash"]


def test_plan_set_spec_fields_and_a_grid_axis(tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(tmp_path))
    data = json.loads(_out(capsys, ["plan", str(path), "--set", "name=tiny-lr", "--set",
                                    "grid.optim.base_lr=[0.01, 0.02]", "resources.gpus_per_trial=1", "--json"]))
    assert data["name"] == "tiny-lr" and data["gpus_per_trial"] == 1
    assert len(data["trials"]) == 4 and {t["axes"]["optim.base_lr"] for t in data["trials"]} == {"0.01", "0.02"}


@pytest.mark.parametrize("sets, needle", [
    (["data.train_images=4"], "--set data.train_images: set by the grid axis data"),
    (["schedule.iters=9"], "--set schedule.iters: set by the grid axis schedule"),
    (["optim.nope=1"], "--set optim.nope: neither a spec field"),
    (["retry.max_failures=twice"], "retry.max_failures"),
    (["optim.base_lr"], "--set optim.base_lr: no value"),
    (["optim.base_lr=fast"], "optim.base_lr"),
])
def test_plan_bad_set_refused(tmp_path, capsys, sets, needle):
    path = write_spec(tmp_path, tiny_spec(tmp_path))
    err = [line for line in _out(capsys, ["plan", str(path), "--set", *sets], code=2).splitlines() if line]
    assert len(err) == 1 and needle in err[0], err


def test_plan_json_matches_the_table(tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(tmp_path, grid=FORKED))
    data = json.loads(_out(capsys, ["plan", str(path), "--json"]))
    table = _out(capsys, ["plan", str(path)])
    assert f"spec hash {data['spec_hash']}" in table
    assert [t["name"] for t in data["trials"]] == ["random-all-1x-R18", "random-all-2x-R18"]
    assert len(data["trunks"]) == 1 and data["trials"][1]["fork"] is not None
    assert data["totals"]["iterations"] == sum(t["iters"] for t in data["trials"])
    assert f"{data['totals']['iterations_with_forking']:,} iterations" in table


# ----------------------------------------------------------------------------------------------
# status: --json, pretrain rows, a waiting branch


def _row(table: str, name: str) -> str:
    return next(line for line in table.splitlines() if line.split()[1:2] == [name])


def _sweep(tmp_path, **changes):
    exp = expand(parse_spec(tiny_spec(tmp_path, **changes)))
    sweep = tmp_path / "runs" / "tiny"
    create_sweep(sweep, exp, "spec\n", "v0")
    return exp, sweep


def test_status_shows_pretrain_jobs_with_their_own_progress(tmp_path, capsys):
    exp, sweep = _sweep(tmp_path, grid={"init": ["random", "pretrained:shapes"], "backbone": ["R18"]},
                        pretrain={"shapes": {"config": {"backbone": "R18", "iters": 40, "batch_size": 8}}})
    out = _out(capsys, ["status", str(sweep)])
    row = _row(out, "pretrain:shapes")
    assert "PENDING" in row and "pretrain 0/1 done" in out
    waiting = _row(out, "shapes-all-1x-R18")
    assert "WAITING" in waiting and "for pretrain:shapes" in waiting  # not a bare PENDING
    plain = _row(out, "random-all-1x-R18")
    assert "PENDING" in plain and "0/6" in plain
    # What trainer.pretrain writes as it trains, then what the sweep's pretrain task writes when done.
    folder = pretrain_dir(sweep, "shapes")
    folder.mkdir(parents=True)
    write_json(folder / "progress.json", {"iteration": 20, "total": 40, "rate": 2.0, "time": 0})
    write_json(sweep / "state.json", {"driver": {"pid": 999999999, "host": "elsewhere-host-x", "started": 1.0,
                                                 "updated": 2.0}, "trials": {}})
    row = _row(_out(capsys, ["status", str(sweep)]), "pretrain:shapes")
    assert "RUNNING" in row and "20/40" in row and "0:00:10" in row  # ETA: 20 iterations at 2 it/s
    data = json.loads(_out(capsys, ["status", str(sweep), "--json"]))
    job = next(r for r in data["rows"] if r["name"] == "pretrain:shapes")
    assert job["role"] == "pretrain" and job["iteration"] == 20 and job["total"] == 40
    write_json(folder / "done.json", {"backbone": "x"})
    out = _out(capsys, ["status", str(sweep)])
    row = _row(out, "pretrain:shapes")
    assert "FINISHED" in row and "40/40" in row and "pretrain 1/1 done" in out
    waiting = _row(out, "shapes-all-1x-R18")
    assert "PENDING" in waiting and "0/6" in waiting  # the backbone is there: it waits for a slot only
    assert "total: 2 trials" in out  # the job is not counted as a trial


def test_status_shows_a_branch_waiting_for_its_trunk(tmp_path, capsys):
    exp, sweep = _sweep(tmp_path, grid=FORKED)
    branch = next(t for t in exp.trials if t.trial_id in exp.forks.branches)
    at = exp.forks.branches[branch.trial_id][1]
    state = {"driver": {"pid": 999999999, "host": "elsewhere-host-x", "started": 1.0, "updated": 2.0},
             "trials": {branch.trial_id: {"status": "PENDING", "iteration": at - 1}}}
    write_json(sweep / "state.json", state)
    row = next(line for line in _out(capsys, ["status", str(sweep)]).splitlines() if branch.name in line)
    assert "WAITING" in row and f"for trunk @ {at}" in row and f"{at - 1}/" not in row
    state["trials"][branch.trial_id]["iteration"] = at  # the trunk's checkpoint is there: waits for a slot
    write_json(sweep / "state.json", state)
    row = next(line for line in _out(capsys, ["status", str(sweep)]).splitlines() if branch.name in line)
    assert "PENDING" in row and f"ready @ {at}" in row


def test_status_json(tmp_path, capsys):
    exp, sweep = _sweep(tmp_path)
    d = sweep / "trials" / exp.trials[0].name
    d.mkdir(parents=True)
    (d / "final_metrics.json").write_text(json.dumps({"bbox/AP": 0.25, "segm/AP": 0.2, "iteration": 6}))
    data = json.loads(_out(capsys, ["status", str(sweep), "--json"]))
    assert data["name"] == "tiny" and data["spec_hash"] == exp.spec_hash
    first = data["rows"][0]
    assert first["status"] == "FINISHED" and first["bbox/AP"] == 0.25 and first["axes"]["data"] == "all"
    assert [r["name"] for r in data["rows"]] == [t.name for t in exp.trials]


def test_live_table_has_pretrain_rows_and_logs_progress_without_a_tty(tmp_path, caplog):
    import io

    from orchestrator.views.monitor import LiveView, SweepMonitor

    exp, sweep = _sweep(tmp_path, grid={"init": ["random", "pretrained:shapes"], "backbone": ["R18"]},
                        pretrain={"shapes": {"config": {"backbone": "R18", "iters": 40, "batch_size": 8}}})
    folder = pretrain_dir(sweep, "shapes")
    folder.mkdir(parents=True)
    write_json(folder / "progress.json", {"iteration": 8, "total": 40, "rate": None, "time": 0})
    out = io.StringIO()  # not a terminal: the table every `period` s, and a log line a minute
    monitor = SweepMonitor(sweep, json.loads((sweep / "sweep.json").read_text()), view=LiveView(out=out))
    with caplog.at_level("INFO", logger="orchestrator.views.monitor"):
        monitor.tick()
        monitor.tick()  # within the minute: no second line
    assert "pretrain:shapes" in out.getvalue() and "8/40" in out.getvalue()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert len(lines) == 1 and "total: 2 trials (2 pending)" in lines[0] and "pretrain 0/1 done" in lines[0]


def test_status_reads_a_real_pretrain_jobs_progress(tmp_path, capsys, synth_cls_root):
    """What trainer.pretrain itself writes in the sweep's pretrain folder is what `status` shows."""
    from trainer.pretrain.train import load_pretrain_config, pretrain

    exp, sweep = _sweep(tmp_path, grid={"init": ["random", "pretrained:shapes"], "backbone": ["R18"]},
                        pretrain={"shapes": {"config": {"backbone": "R18", "iters": 6, "batch_size": 8}}})
    cfg = load_pretrain_config(None, [f"data_root={synth_cls_root}", f"output_dir={pretrain_dir(sweep, 'shapes')}",
                                      "backbone=R18", "norm=GN", "image_size=32", "iters=6", "batch_size=8",
                                      "num_workers=0", "threads=1", "checkpoint_period=3", "log_period=3"])
    pretrain(cfg, stop_after=3)  # a job cut short: its driver is gone
    write_json(sweep / "state.json", {"driver": {"pid": 999999999, "host": "elsewhere-host-x", "started": 1.0,
                                                 "updated": 2.0, "finished": 3.0, "status": "KILLED"}, "trials": {}})
    row = _row(_out(capsys, ["status", str(sweep)]), "pretrain:shapes")
    assert "INTERRUPTED" in row and "3/6" in row, row
