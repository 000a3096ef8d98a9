"""Ray/Tune's records during a sweep: one line each in the terminal, the full text in SWEEP/driver.log."""

from __future__ import annotations

import io
import logging

from orchestrator.state.driver_log import sweep_log


def test_ray_traceback_is_one_terminal_line_and_whole_in_the_sweep_log(tmp_path):
    terminal = io.StringIO()
    before = list(logging.getLogger("ray").handlers)
    with sweep_log(tmp_path, terminal) as path:
        try:
            raise FileNotFoundError("/x/result.json")
        except FileNotFoundError:
            logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed for trial t1",
                                                                          exc_info=True)
        logging.getLogger("ray.tune.analysis").warning("Failed to fetch metrics for 1 trial(s):\n- t1: oops")
    lines = terminal.getvalue().splitlines()
    assert lines == [
        f"ERROR ray.tune.execution.tune_controller: Trial task failed for trial t1 (FileNotFoundError) "
        f"(full text: {path})",
        f"WARNING ray.tune.analysis: Failed to fetch metrics for 1 trial(s) (full text: {path})"]
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "- t1: oops" in text
    assert logging.getLogger("ray").handlers == before  # Ray's own handler is back after the sweep
