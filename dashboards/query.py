"""Reading a sweep back from MLflow: the dashboards' only MLflow client.

`find_sweep(target)` says where a sweep is tracked (from its spec, its folder on the storage path, or
its name plus a tracking URI) without touching MLflow; `load_sweep` reads its newest parent run and
that run's child runs into two tidy tables:

- `trials`: one row per child run (name, run id, status, the four axes, its replicate and runtime.seed,
  init kind, iterations);
- `metrics`: one row per (trial, metric, step) for the AP metrics (`bbox/*`, `segm/*`: every
  evaluation) and the train loss (`train/loss`, as often as the sweep logs it), and one per (trial,
  metric) for the cost (`seen/*`: its latest point).

Nothing here writes to the store except `log_report` and `log_claims`, which attach a report folder
and the claims' verdicts to the parent run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dashboards.errors import SweepDataError
from dashboards.paper import init_kind
from orchestrator.tracking.run_notes import claims_note
from orchestrator.tracking.mlflow_runs import latest_metrics

logger = logging.getLogger(__name__)
REPORT_PREFIXES = ("bbox/", "segm/", "seen/", "keypoints/", "voc/")  # keypoints/voc: dashboards.keypoints_voc
TRAIN_LOSS = "train/loss"  # the total train loss: the report's Figure 8 view (loss against AP)
LAST_ONLY = ("seen/",)  # read as the run's latest point, not a history (see _run_points)
AXES = ("init", "data", "schedule", "backbone")
TRIAL_COLUMNS = ["name", "run_id", "trial_id", "status", *AXES, "replicate", "seed", "init_kind", "model_init",
                 "total_iters", "norm", "body_norm"]
METRIC_COLUMNS = ["name", "metric", "step", "value"]


@dataclass
class SweepTarget:
    """Where a sweep is tracked: its name, its MLflow URI and (when known) its folder on disk."""

    name: str
    uri: str
    sweep_dir: Path | None = None


@dataclass
class SweepData:
    target: SweepTarget
    experiment_id: str
    parent_id: str
    parent_tags: dict[str, str]
    trials: pd.DataFrame
    metrics: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # what the reader should know (older parents, ...)


def find_sweep(target: str | Path | None, tracking_uri: str | None = None) -> SweepTarget | None:
    """A spec file, a sweep folder or a sweep name -> its name, URI and folder; None: no sweep named.

    A spec's relative `sqlite:///` URI is relative to the directory `run` was started in (the sweep
    record's `cwd`), else to the current one, like `run` itself; a `--set tracking_uri=...` that `run`
    stored in the record counts, as it does for `resume`.
    """
    import orchestrator.state.folder as st
    from orchestrator.sweep.sets import apply_sets
    from orchestrator.tracking.mlflow_runs import resolve_uri

    if target is None:
        return None
    path = Path(target)
    if str(target).startswith(("s3://", "gs://")) or path.is_dir() or path.is_file():
        sweep_dir = st.find_sweep_dir(target)  # an object store's sweep: mirrored here first  # a folder without sweep.json / an unstarted spec: typed error
        record = st.read_record(sweep_dir) or {}
        spec = apply_sets(yaml.safe_load((sweep_dir / "spec.yaml").read_text()) or {}, record.get("sets") or [])
        cwd = Path(record["cwd"]) if record.get("cwd") and Path(record["cwd"]).is_dir() else None
        uri = tracking_uri or resolve_uri(spec.get("tracking_uri"), cwd)
        return SweepTarget(record.get("name", sweep_dir.name), uri, sweep_dir)
    if "/" in str(target) or str(target).endswith((".yaml", ".yml")):
        raise SweepDataError(f"{target}: no such spec file or sweep folder")
    return SweepTarget(str(target), tracking_uri or resolve_uri(None))


def check_store(uri: str) -> None:
    """A SQLite store must exist: opening a missing one would create an empty database."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise SweepDataError(f"no MLflow store at {db} (tracking_uri {uri})")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(target: SweepTarget) -> str:
    check_store(target.uri)
    exp = _client(target.uri).get_experiment_by_name(target.name)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise SweepDataError(f"unknown sweep {target.name!r}: no MLflow experiment of that name in {target.uri}")
    return exp.experiment_id


def load_sweep(target: SweepTarget) -> SweepData:
    """The newest parent run of the sweep's experiment, its child runs and their metric histories."""
    exp_id = experiment_id(target)
    client = _client(target.uri)
    parents = client.search_runs([exp_id], filter_string="tags.role = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=50)
    if not parents:
        raise SweepDataError(f"sweep {target.name!r} has no runs in {target.uri} (it was never started)")
    parent = parents[0]
    notes = []
    if len(parents) > 1:
        notes.append(f"{len(parents) - 1} older parent run(s) of this experiment (another spec hash) are not "
                     f"shown; this report is of spec hash {parent.data.tags.get('spec_hash', '?')}")
    children = _search_all(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # Trials only: a helper run under the parent (another role) is not a grid point.
    children = [r for r in children if r.data.tags.get("role", "trial") == "trial"]
    if not children:
        raise SweepDataError(f"sweep {target.name!r} has no trial runs in {target.uri}")
    trials = pd.DataFrame([_trial_row(run) for run in children], columns=TRIAL_COLUMNS)
    trials = trials.sort_values(["backbone", "data", "init", "schedule", "name"]).reset_index(drop=True)
    rows = []
    for run in children:
        rows.extend(_run_points(client, run))
    if not rows:
        raise SweepDataError(f"sweep {target.name!r} is empty: none of its {len(trials)} trial runs has logged "
                             f"a metric yet in {target.uri}")
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS).sort_values(["name", "metric", "step"])
    logger.info("sweep %s: %d trial runs, %d metric points from %s", target.name, len(trials), len(metrics),
                target.uri)
    return SweepData(target, exp_id, parent.info.run_id, dict(parent.data.tags), trials,
                     metrics.reset_index(drop=True), notes)


def _run_points(client: Any, run: Any) -> list[tuple[str, str, int, float]]:
    """(name, key, step, value): the whole history of AP keys (one point per evaluation), and only the
    latest point of `seen/*` (counted at every logged iteration; the report needs its last value, and
    the cost figure interpolates between 0 and it), taken from the run itself: no request per key."""
    latest = latest_metrics(run) or {}  # without it: every key from its history
    out = []
    for key in sorted(k for k in run.data.metrics if k.startswith(REPORT_PREFIXES) or k == TRAIN_LOSS):
        if key.startswith(LAST_ONLY) and key in latest:
            out.append((run.info.run_name, key, int(latest[key].step), float(latest[key].value)))
            continue
        out.extend((run.info.run_name, key, m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    return out


def _search_all(client: Any, exp_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=500, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _trial_row(run: Any) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    axes = {a: tags.get(f"axis.{a}", "") for a in AXES}
    return {"name": run.info.run_name, "run_id": run.info.run_id, "trial_id": tags.get("trial_id", ""),
            "status": run.info.status, **axes, "replicate": tags.get("axis.replicate") or "0",
            "seed": params.get("runtime.seed", "0"), "init_kind": init_kind(axes["init"]),
            "model_init": params.get("model.init", ""), "total_iters": _total_iters(params),
            "norm": params.get("model.norm", ""), "body_norm": _body_norm(tags, params)}


def _body_norm(tags: dict[str, str], params: dict[str, str]) -> str:
    """The ResNet body's norm: param model.body_norm (tag body_norm), else model.norm (older runs)."""
    body = params.get("model.body_norm", "")
    return tags.get("body_norm") or (body if body not in ("", "None") else params.get("model.norm", ""))


def _total_iters(params: dict[str, str]) -> int | None:
    """The schedule's length from the flat config: `schedule.iters`, else length x iters_per_x."""
    try:
        iters = yaml.safe_load(params.get("schedule.iters", "null"))
        if iters:
            return int(iters)
        length = str(yaml.safe_load(params.get("schedule.length", "null")) or "1x")
        return round(float(length.rstrip("x")) * int(yaml.safe_load(params["schedule.iters_per_x"])))
    except (KeyError, ValueError, TypeError, yaml.YAMLError):
        return None


def log_report(target: SweepTarget, parent_id: str, folder: Path, artifact_path: str = "report") -> None:
    """Attach the report folder to the sweep's parent run (it then shows under its Artifacts)."""
    client = _client(target.uri)
    client.log_artifacts(parent_id, str(folder), artifact_path=artifact_path)
    client.set_tag(parent_id, "report", f"{artifact_path}/index.html")
    logger.info("report logged to run %s (artifacts %s/)", parent_id, artifact_path)


def log_claims(target: SweepTarget, parent_id: str, claims: dict[str, Any]) -> None:
    """The claims' verdicts on the sweep's parent run: `claims.json` at the artifact root, a `claim.C1`
    ... tag each, so the runs table shows them without opening the report, and a line each in the
    run's description."""
    client = _client(target.uri)
    client.log_dict(parent_id, claims, "claims.json")
    verdicts = {key: c for key, c in claims.items() if "verdict" in c}  # not the noise floor
    for key, claim in verdicts.items():
        client.set_tag(parent_id, f"claim.{key}", claim["verdict"])
    note = client.get_run(parent_id).data.tags.get("mlflow.note.content", "")
    client.set_tag(parent_id, "mlflow.note.content", claims_note(note, verdicts))  # the run page's description
    logger.info("claims logged to run %s: %s", parent_id, ", ".join(f"{k} {c['verdict']}" for k, c in verdicts.items()))


VIEW_TAG = "mlflow.sharedViewState."  # an experiment tag the MLflow UI opens with ?viewStateShareKey=KEY


def save_view(target: SweepTarget, exp_id: str) -> str:
    """Save the sweep's view of its runs table in MLflow (the UI's "Share" view, an experiment tag)
    and return its key: runs grouped by their `role` tag, so the trials are rows of their own (in
    MLflow's default nesting they hide behind the parent's collapsed expander, and MLflow 3 keeps
    expanded rows out of a shared view), with their axes, last box/mask AP and duration as columns;
    the sweep's own run (params, `final/*` metrics, the claims) heads the table in its group."""
    client = _client(target.uri)
    axes: list[str] = []
    for run in _search_all(client, exp_id, "tags.role = 'trial'"):
        axes += [k for k in sorted(run.data.tags) if k.startswith("axis.") and k not in axes]
    order = {f"axis.{a}": i for i, a in enumerate(AXES)}
    axes.sort(key=lambda k: (order.get(k, len(order)), k))
    # Few columns, so that the axes fit beside the names (the UI's Columns menu adds any other).
    columns = [f"tags.`{a}`" for a in axes] + ["metrics.`bbox/AP`", "metrics.`segm/AP`", "attributes.`Duration`"]
    state = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": True,
             "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
             "selectedColumns": columns, "useGroupedValuesInCharts": False,
             "runsHiddenMode": "SHOW_ALL",
             "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "role"}]}}
    key = "trials"
    client.set_experiment_tag(exp_id, VIEW_TAG + key, json.dumps(state))
    return key
