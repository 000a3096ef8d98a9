"""A trial attempt's report without Ray: a damaged checkpoint skipped on resume is named where it is seen."""

from __future__ import annotations

import json

import torch

from orchestrator.worker.reporting import K_WARNINGS, TuneReporter, checkpoint_warnings
from tests.orchestrator.task_factory import make_task
from trainer.engine import checkpoint as ckpt
from trainer.engine.reporters import RunInfo


def test_a_skipped_damaged_checkpoint_is_named_in_the_attempt_row_and_first_report(tmp_path):
    folder = tmp_path / "checkpoints"
    for it in (3, 6):
        ckpt.save_atomic({"model": {"w": torch.ones(4)}, "iteration": it}, ckpt.checkpoint_path(folder, it))
    newest = ckpt.checkpoint_path(folder, 6)
    newest.write_bytes(newest.read_bytes()[:20])
    task = make_task("t1", 12, folder=tmp_path, run_id="run-1", config={"checkpoint": {"period": 3}})
    sent = []
    with checkpoint_warnings() as warnings:
        reporter = TuneReporter(sent.append, task, 2, warnings=warnings,
                                placement={"node_id": "n1", "gpu_ids": ["0"]})
        path, state = ckpt.load_latest(folder)
        reporter.start(RunInfo(None, tmp_path, state["iteration"], 12, {"mlflow_run_id": "run-1"}))
    assert path == ckpt.checkpoint_path(folder, 3)
    row = json.loads((tmp_path / "attempts.jsonl").read_text())
    assert row["start_iter"] == 3 and (row["node_id"], row["gpu_ids"]) == ("n1", ["0"])
    assert len(row["warnings"]) == 1 and str(newest) in row["warnings"][0]
    assert str(newest) in sent[0][K_WARNINGS] and sent[0]["trial/event"] == "start"
    # Nothing skipped, nothing to warn about; and the capture is gone after its block.
    with checkpoint_warnings() as quiet:
        TuneReporter(sent.append, task, 3, warnings=quiet).start(
            RunInfo(None, tmp_path, 3, 12, {"mlflow_run_id": "run-1"}))
    ckpt.load_latest(folder)
    assert quiet == [] and K_WARNINGS not in sent[-1]


def test_a_preempted_attempt_is_recorded_and_shown_apart_from_failures(tmp_path):
    """Its attempt's second row and last report; the driver's row, state.json, `status` and the table."""
    import orchestrator.state.folder as st
    from orchestrator.views.monitor import SweepMonitor
    from orchestrator.views.status import render_status
    from orchestrator.worker.trainable import next_attempt
    from trainer.engine.preemption import PreemptedError

    record = {"name": "sw", "spec_hash": "h", "code_version": "c",
              "trials": [{"trial_id": "t1", "name": "t1", "total_iters": 12}]}
    sweep = tmp_path / "sw"
    out = st.trial_dir(sweep, "t1").make().path
    st.write_json(sweep / st.RECORD, record)
    task = make_task("t1", 12, folder=out, run_id="run-1", config={"checkpoint": {"period": 3}})
    monitor = SweepMonitor(sweep, record)
    reporter = TuneReporter(lambda m: monitor.on_result("t1", m), task, 1)
    reporter.start(RunInfo(None, out, 0, 12, {}))
    reporter.finish("preempted", PreemptedError(5, "SIGTERM"))
    monitor.on_error("t1", final=False, error="PreemptedError: preempted at iteration 5")
    rows = [json.loads(x) for x in (out / "attempts.jsonl").read_text().splitlines()]
    assert rows[1] == {**rows[1], "attempt": 1, "preempted_at": 5, "notice": "SIGTERM",
                       "reason": "preempted at iteration 5"}
    assert next_attempt(st.trial_dir(sweep, "t1")) == 2  # two rows, one attempt
    row = st.read_state(sweep)["trials"]["t1"]
    assert (row["status"], row["preemptions"], row["iteration"]) == ("PENDING", 1, 5)
    assert "error" not in row  # no failure recorded
    text = render_status(sweep)
    assert "~ t1: preempted 1x, last at iteration 5" in text and "1 preemption" in text and "! t1" not in text
