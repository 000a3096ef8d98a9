"""MLflow bookkeeping of a sweep; the only module that imports mlflow.

One experiment per sweep name; one parent run per sweep (name + spec hash); one nested child run per
trial, found or created by its tags, so a restarted driver never makes a second one. Child runs carry
the flat resolved trial config as params and `axis.*`, `trial_id`, `sweep`, `spec_hash`,
`code_version` and `body_norm` (the ResNet body's norm) as tags; they are named by the readable trial name.
Every run also gets MLflow's own `mlflow.source.git.commit`, `mlflow.user`, `mlflow.source.name` and a
description (`mlflow.note.content`, words from `orchestrator.tracking.run_notes`); the parent the sweep's
params (spec hash, axes, counts) and, as trials finish, their final APs as `final/<trial>/bbox_AP`;
a trial's run its training set (`log_input`). A trial's run is made when the trial starts
(`plan_child` now, `ensure_child` then), so its start and end times are the trial's own: MLflow
cannot move a run's start time afterwards.

Metrics are append-only in MLflow, so `MetricLogger` never writes a (run, key, step) twice: it asks
MLflow once per run for the last step of each key already logged and drops anything at or before
it (a retried trial replays the steps after its last checkpoint). Its `log_rows` is the one place
metric points are written; `orchestrator.tracking.metric_sync` feeds it from the trials' metrics.jsonl files,
from one driver thread (a SQLite store wants a single writer; a server is fine with it too). MLflow's
own HTTP retries (7, ~4 min by default) are lowered for our clients (`HTTP_ENV`): the syncer's own
retry loop waits out an outage, and one stuck request must not hold a driver for minutes.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

import orchestrator.tracking.run_notes as run_notes
from orchestrator.errors import TrackingError

logger = logging.getLogger(__name__)

# keypoints/voc: trainer.modeling.detectors; final/: the parent run's summary of each trial (`SweepTracker.log_final`)
METRIC_PREFIXES = ("train/", "bbox/", "segm/", "seen/", "keypoints/", "voc/", "final/")
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch request
_PARAM_BATCH = 100
_PARAM_MAX = 6000
# Our own retry loops wait out an outage; MLflow's request-level retries only need to ride out a blip.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


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

    if is_server(uri):
        for key, value in HTTP_ENV.items():  # read by MLflow at every request; a user's setting wins
            os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


class SweepTracker:
    """Driver side: the sweep's experiment, its parent run and one child run per trial."""

    def __init__(self, uri: str, sweep: str, spec_hash: str, code_version: str, source: str = "orchestrator"):
        self.uri, self.sweep, self.spec_hash, self.code_version = uri, sweep, spec_hash, code_version
        self.client = _client(uri)
        self.experiment_id = self._experiment()
        self.parent_id = ""
        self.loggers: dict[str, MetricLogger] = {}
        self._planned: dict[str, tuple] = {}
        self.system_tags = _system_tags(code_version, source)

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

    def open_parent(self, spec_text: str | None = None, params: Mapping[str, str] | None = None,
                    note: str | None = None) -> str:
        """Find or create the sweep's run; add the params it lacks, and the description if it has none."""
        run = self._find([f"tags.sweep = '{self.sweep}'", f"tags.spec_hash = '{self.spec_hash}'",
                          "tags.role = 'sweep'"])
        if run is None:
            tags = {"sweep": self.sweep, "spec_hash": self.spec_hash, "role": "sweep",
                    "code_version": self.code_version, **self.system_tags}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.sweep)
            if spec_text is not None:
                self.client.log_text(run.info.run_id, spec_text, "spec.yaml")
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, {k: v for k, v in (params or {}).items() if k not in run.data.params})
        if note and not run.data.tags.get("mlflow.note.content"):  # the report may have added its claims
            self.client.set_tag(self.parent_id, "mlflow.note.content", note)
        return self.parent_id

    def find_children(self) -> dict[str, str]:
        """trial_id -> run id of the trial runs this parent has already (one search; a resumed sweep)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token,
                                           filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'")
            runs.extend(page)
            token = page.token
            if not token:
                return {tid: r.info.run_id for r in runs if (tid := r.data.tags.get("trial_id"))}

    @property
    def planned(self) -> list[str]:
        """The trial ids `plan_child` was given."""
        return list(self._planned)

    def plan_child(self, trial_id: str, name: str, axes: Mapping[str, str], params: Mapping[str, Any],
                   tags: Mapping[str, str] | None = None) -> None:
        """Remember what the trial's run will carry; `ensure_child` makes it when the trial starts."""
        self._planned[trial_id] = (name, dict(axes), dict(params), dict(tags or {}))

    def ensure_child(self, trial_id: str, start_time: float | None = None) -> str:
        """The planned trial's run, made now (started at `start_time`, epoch seconds) if it is not there."""
        name, axes, params, tags = self._planned[trial_id]
        return self.child_run(trial_id, name, axes, params, tags, start_time=start_time)

    def child_run(self, trial_id: str, name: str, axes: Mapping[str, str], params: Mapping[str, Any],
                  tags: Mapping[str, str] | None = None, start_time: float | None = None) -> str:
        """Find (by trial_id under this parent) or create the trial's run; fill in missing params/tags."""
        if "model.body_norm" in params:  # the body's norm as a tag too: FrozenBN vs GN arms filter by it
            tags = {**(tags or {}), "body_norm": str(params["model.body_norm"])}
        run = self._find([f"tags.trial_id = '{trial_id}'", f"tags.`mlflow.parentRunId` = '{self.parent_id}'"])
        if run is None:
            base = {"mlflow.parentRunId": self.parent_id, "trial_id": trial_id, "trial_name": name,
                    "sweep": self.sweep, "spec_hash": self.spec_hash, "code_version": self.code_version,
                    "role": "trial", **{f"axis.{k}": str(v) for k, v in axes.items()}, **self.system_tags,
                    "mlflow.note.content": run_notes.trial_note(name, axes, params), **(tags or {})}
            start = int(start_time * 1000) if start_time is not None else None
            run = self.client.create_run(self.experiment_id, tags=base, run_name=name, start_time=start)
            self.client.update_run(run.info.run_id, status="SCHEDULED")
            if "data.root" in params:
                self._log_dataset(run.info.run_id, run_notes.dataset_input(params))
        for key, value in (tags or {}).items():
            if run.data.tags.get(key) != value:
                self.client.set_tag(run.info.run_id, key, value)
        have = run.data.params
        todo = {k: v for k, v in _param_values(params).items() if k not in have}
        self._log_params(run.info.run_id, todo)
        return run.info.run_id

    def _log_dataset(self, run_id: str, data: Mapping[str, str]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(**{**data, "source_type": "local", "source": json.dumps({"uri": data["source"]})})
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])

    def log_final(self, trial_name: str, final: Mapping[str, Any]) -> None:
        """A finished trial's final APs as the parent's summary metrics `final/<trial>/bbox_AP`."""
        if self.parent_id:  # step 0, once per key: the logger drops a repeat (a resumed sweep)
            self.metric_logger(self.parent_id).log(0, run_notes.final_metrics(trial_name, final))

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i:i + _PARAM_BATCH])

    def set_status(self, run_id: str, status: str, at: float | None = None) -> None:
        """RUNNING while a trial runs; FINISHED / FAILED / KILLED end the run (at `at`, epoch seconds)."""
        if status in ("FINISHED", "FAILED", "KILLED"):
            self.client.set_terminated(run_id, status=status, end_time=int(at * 1000) if at else None)
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

    def finish(self, status: str, wait_s: float = 60.0) -> None:
        """End the parent run; a server that stays away for `wait_s` is logged, not raised (the sweep is done)."""
        deadline = time.monotonic() + wait_s
        while self.parent_id:
            try:
                self.set_status(self.parent_id, status)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    logger.error("could not mark the sweep's MLflow run %s: %s", status, exc)
                    return
                time.sleep(2.0)


def latest_metrics(run: Any) -> dict[str, Any] | None:
    """A fetched run's latest `Metric` per key (value, step, timestamp), or None if MLflow hides them.

    MLflow's public `RunData.metrics` keeps the latest values without their steps; the `Metric`
    objects behind it (`RunData._metric_objs`, private) carry the steps. Reading them lets one
    `get_run` answer for every key, where the public route costs one `get_metric_history` per key
    (dozens per trial, at each resume and for each trial of a report). This is the one place that
    reads the private field; callers fall back to the public route when it answers None.
    """
    objs = getattr(run.data, "_metric_objs", None)
    return None if objs is None else {m.key: m for m in objs}


def latest_steps(client: Any, run_id: str) -> dict[str, int]:
    """The run's largest step per metric key (MLflow's latest metric is the one at the largest step)."""
    run = client.get_run(run_id)
    latest = latest_metrics(run)
    if latest is not None:
        return {k: int(m.step) for k, m in latest.items()}
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in run.data.metrics}


class MetricLogger:
    """Logs metric batches to one run, never a (key, step) at or before one already there.

    The run's last step per key is asked from MLflow once (its latest metrics, one request), then
    kept; `forget` after a failed request makes the next call ask again.
    """

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self._last: dict[str, int] | None = None

    def last_steps(self) -> dict[str, int]:
        if self._last is None:
            self._last = latest_steps(self.client, self.run_id)
        return self._last

    def forget(self) -> None:
        """After a failed request: ask the server again what it has (it may have written it anyway)."""
        self._last = None

    def log(self, step: int, metrics: Mapping[str, float]) -> int:
        """Log what is new; returns how many points were written."""
        return self.log_rows([(step, metrics)])

    def log_rows(self, rows: Iterable[tuple[int, Mapping[str, float]]], period: int = 1,
                 periodic: tuple[str, ...] = (), final: int | None = None) -> int:
        """Log, in as few requests as possible, every point of `rows` (in step order) past its key's last step.

        Keys starting with `periodic` go only at the first row past each multiple of `period` (and at
        step `final`); returns how many points were written.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        last = dict(self.last_steps())
        fresh = []
        for step, metrics in rows:
            step = int(step)
            for key, value in sorted(metrics.items()):
                if not key.startswith(METRIC_PREFIXES) or not _finite(value) or _undefined_ap(key, value):
                    continue
                prev = last.get(key, -1)
                if step <= prev:
                    continue
                if key.startswith(periodic) and prev >= 0 and step != final and step // period == prev // period:
                    continue
                fresh.append(Metric(key, float(value), now, step))
                last[key] = step
        for i in range(0, len(fresh), _BATCH):
            chunk = fresh[i:i + _BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)  # the one place metric points are written
            for m in chunk:  # per chunk: a later chunk failing leaves the earlier ones counted
                self._last[m.key] = max(self._last.get(m.key, -1), m.step)
        return len(fresh)


def _system_tags(code_version: str, source: str) -> dict[str, str]:
    """MLflow's own tags: the UI's "Source", "Created by" and git commit columns read these."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no $USER (some containers)
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.name": source, "mlflow.source.type": "LOCAL"}
    if not code_version.startswith("src-"):  # a git commit (maybe "-dirty"), not a hash of the sources
        tags["mlflow.source.git.commit"] = code_version.removesuffix("-dirty")
    return tags


def _undefined_ap(key: str, value: Any) -> bool:
    """COCO's -1 sentinel ("no objects of that size", e.g. bbox/APs on a set without small objects)
    is not an AP: it is left out of MLflow, so plots and best-of queries never see it; reports,
    which read final_metrics.json, keep showing it as n/a."""
    return key.startswith(("bbox/", "segm/")) and float(value) < 0


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
