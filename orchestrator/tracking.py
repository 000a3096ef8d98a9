"""MLflow bookkeeping of a sweep; the only module that imports mlflow.

One experiment per sweep name; one parent run per sweep (name + spec hash); one nested child run per
trial, found or created by its tags, so a restarted driver never makes a second one. Child runs carry
the flat resolved trial config as params and `axis.*`, `trial_id`, `sweep`, `spec_hash`,
`code_version` as tags; they are named by the readable trial name.

Metrics are append-only in MLflow, so `MetricLogger` never writes a (run, key, step) twice: it asks
MLflow once per key for the last step already logged and drops anything at or before it (a retried
trial replays the steps after its last checkpoint); `fill` adds the points a run lacks at any step,
from the trials' own metrics.jsonl (a schedule branch's run gets its trunk's points up to its fork
point that way, and a finished trial whatever a killed driver never logged). A SQLite store must have
a single writer: the driver logs what trials report through Tune; with a tracking server (http://...)
a trial may log directly with the same MetricLogger.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

from orchestrator.errors import TrackingError

logger = logging.getLogger(__name__)

METRIC_PREFIXES = ("train/", "bbox/", "segm/", "seen/")
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch request
_PARAM_BATCH = 100
_PARAM_MAX = 6000


def resolve_uri(uri: str | None, cwd: Path | None = None) -> str:
    """The spec's URI, or a SQLite store `mlflow.db` in the working directory (what `mlflow ui` opens)."""
    if not uri:
        return f"sqlite:///{(Path(cwd or Path.cwd()) / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri.removeprefix("sqlite:///")  # relative to the driver's cwd; workers may differ
        return f"sqlite:///{(Path(cwd or Path.cwd()) / rel).resolve()}"
    return uri


def is_server(uri: str) -> bool:
    """Whether trials may log directly (a tracking server serialises the writes)."""
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before anything is launched, with the cause in one line."""
    if is_server(uri):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"tracking_uri {uri}: /health answered {resp.status}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"tracking_uri {uri}: MLflow server unreachable ({reason})") from None
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise TrackingError(f"tracking_uri {uri}: folder {db.parent} does not exist")
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(f"tracking_uri {uri}: {db} is not writable")
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking_uri {uri}: MLflow >= 3.13 refuses file stores; use sqlite:///PATH.db "
                            "or an http:// tracking server")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # any backend error: report it, launch nothing
        raise TrackingError(f"tracking_uri {uri}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


class SweepTracker:
    """Driver side: the sweep's experiment, its parent run and one child run per trial."""

    def __init__(self, uri: str, sweep: str, spec_hash: str, code_version: str):
        self.uri, self.sweep, self.spec_hash, self.code_version = uri, sweep, spec_hash, code_version
        self.client = _client(uri)
        self.experiment_id = self._experiment()
        self.parent_id = ""
        self.loggers: dict[str, MetricLogger] = {}

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.sweep)
        if exp is not None and exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        if exp is not None:
            return exp.experiment_id
        # Artifacts next to a SQLite store, not in ./mlruns of whatever directory the driver runs in.
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / self.sweep).as_uri()
        return self.client.create_experiment(self.sweep, artifact_location=location)

    def _find(self, filters: Iterable[str]) -> Any | None:
        found = self.client.search_runs([self.experiment_id], filter_string=" and ".join(filters),
                                        order_by=["attributes.start_time ASC"], max_results=5)
        return found[0] if found else None

    def open_parent(self, spec_text: str | None = None) -> str:
        run = self._find([f"tags.sweep = '{self.sweep}'", f"tags.spec_hash = '{self.spec_hash}'",
                          "tags.role = 'sweep'"])
        if run is None:
            tags = {"sweep": self.sweep, "spec_hash": self.spec_hash, "role": "sweep",
                    "code_version": self.code_version}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.sweep)
            if spec_text is not None:
                self.client.log_text(run.info.run_id, spec_text, "spec.yaml")
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.parent_id = run.info.run_id
        return self.parent_id

    def child_run(self, trial_id: str, name: str, axes: Mapping[str, str], params: Mapping[str, Any],
                  tags: Mapping[str, str] | None = None) -> str:
        """Find (by trial_id under this parent) or create the trial's run; fill in missing params/tags."""
        run = self._find([f"tags.trial_id = '{trial_id}'", f"tags.`mlflow.parentRunId` = '{self.parent_id}'"])
        if run is None:
            base = {"mlflow.parentRunId": self.parent_id, "trial_id": trial_id, "trial_name": name,
                    "sweep": self.sweep, "spec_hash": self.spec_hash, "code_version": self.code_version,
                    "role": "trial", **{f"axis.{k}": str(v) for k, v in axes.items()}, **(tags or {})}
            run = self.client.create_run(self.experiment_id, tags=base, run_name=name)
            self.client.update_run(run.info.run_id, status="SCHEDULED")
        for key, value in (tags or {}).items():
            if run.data.tags.get(key) != value:
                self.client.set_tag(run.info.run_id, key, value)
        have = run.data.params
        todo = {k: v for k, v in _param_values(params).items() if k not in have}
        self._log_params(run.info.run_id, todo)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i:i + _PARAM_BATCH])

    def set_status(self, run_id: str, status: str) -> None:
        """RUNNING while a trial runs; FINISHED / FAILED / KILLED end the run."""
        if status in ("FINISHED", "FAILED", "KILLED"):
            self.client.set_terminated(run_id, status=status)
        else:
            self.client.update_run(run_id, status=status)

    def log_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path))

    def metric_logger(self, run_id: str) -> "MetricLogger":
        if run_id not in self.loggers:
            self.loggers[run_id] = MetricLogger(self.client, run_id)
        return self.loggers[run_id]

    def finish(self, status: str) -> None:
        if self.parent_id:
            self.set_status(self.parent_id, status)


class MetricLogger:
    """Logs metric batches to one run, never a (key, step) at or before one already there."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self._last: dict[str, int] = {}

    @classmethod
    def for_uri(cls, uri: str, run_id: str) -> "MetricLogger":
        return cls(_client(uri), run_id)

    def last_step(self, key: str) -> int:
        if key not in self._last:
            history = self.client.get_metric_history(self.run_id, key)
            self._last[key] = max((m.step for m in history), default=-1)
        return self._last[key]

    def log(self, step: int, metrics: Mapping[str, float]) -> int:
        """Log what is new; returns how many points were written."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())
                 if k.startswith(METRIC_PREFIXES) and _finite(v) and step > self.last_step(k)]
        for i in range(0, len(fresh), _BATCH):
            self.client.log_batch(self.run_id, metrics=fresh[i:i + _BATCH])
        for m in fresh:
            self._last[m.key] = max(self._last.get(m.key, -1), m.step)
        return len(fresh)

    def fill(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> int:
        """Log every (key, step) of `rows` the run lacks, whatever its last step; returns how many."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        have: dict[str, set[int]] = {}
        fresh = []
        for step, metrics in rows:
            for key, value in sorted(metrics.items()):
                if not key.startswith(METRIC_PREFIXES) or not _finite(value):
                    continue
                if key not in have:
                    have[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
                if int(step) not in have[key]:
                    have[key].add(int(step))
                    fresh.append(Metric(key, float(value), now, int(step)))
        for i in range(0, len(fresh), _BATCH):
            self.client.log_batch(self.run_id, metrics=fresh[i:i + _BATCH])
        for key, steps in have.items():
            self._last[key] = max([self._last.get(key, -1), *steps])
        return len(fresh)


def _finite(value: Any) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return v == v and v not in (float("inf"), float("-inf"))


def _param_values(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text[:_PARAM_MAX]
    return out
