"""Fault injection for the reliability tests, loaded into each trial as a plugin reporter module.

The seam is the tests' own: `FAULTS` puts tests/plugins/site on the driver's PYTHONPATH, which the
driver passes to its trials; the dist-info folder there registers `reporters` below under the
`orchestrator.reporters` entry-point group (`orchestrator.worker.reporting`), so only a trial of a test
that asked for faults loads this module, and no product code names it or reads a variable for it.
(Not Ray's `worker_process_setup_hook`: that would need the product's `ray.init` to take it.)

Set in the driver's environment (it forwards ORCHESTRATOR_* to the trials), with `FAULTS` added:
ORCHESTRATOR_FAIL_ONCE="TRIAL_NAME@ITER[,...]" makes that trial raise once, at its first report at
or after ITER (a marker file in its folder keeps it to once); ORCHESTRATOR_DELAY=
"TRIAL_NAME@SECONDS[,...]" makes it sleep that long at every training report (to hold a kill window open).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from trainer.engine.reporters import Reporter

REPO = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "site"  # holds the entry point's dist-info
FAULTS = {"PYTHONPATH": os.pathsep.join([str(REPO), str(SITE)])}  # what a test adds to the driver's env
FAIL_ENV = "ORCHESTRATOR_FAIL_ONCE"
DELAY_ENV = "ORCHESTRATOR_DELAY"


class Delay(Reporter):
    """Sleep at every training report, so a test can kill the driver while this trial runs."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def log(self, step: int, metrics) -> None:
        if "train/loss" in metrics:
            time.sleep(self.seconds)


class FailOnce(Reporter):
    """Raise at the first report at or after `at`, once per trial folder."""

    def __init__(self, at: int, folder: Path):
        self.at, self.marker = at, Path(folder) / "injected_failure"

    def log(self, step: int, metrics) -> None:
        if step >= self.at and not self.marker.exists():
            self.marker.write_text(f"{step}\n")
            raise RuntimeError(f"injected failure at iteration {step} ({FAIL_ENV})")


def reporters(task) -> list[Reporter]:
    """The plugin entry point (an `orchestrator.worker.task.Task` in, reporters out)."""
    found: list[Reporter] = []
    at = _setting(FAIL_ENV, task.name)
    if at is not None:
        found.append(FailOnce(int(at), task.folder.path))
    delay = _setting(DELAY_ENV, task.name)
    if delay is not None:
        found.append(Delay(float(delay)))
    return found


def _setting(env: str, name: str) -> str | None:
    for item in filter(None, os.environ.get(env, "").split(",")):
        trial, _, value = item.rpartition("@")
        if trial == name:
            return value
    return None
