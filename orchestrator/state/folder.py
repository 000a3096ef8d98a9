"""A sweep's folder on the storage path: its identity, its stored spec and its trials' progress.

Driver side; pure (no Ray, no MLflow): `status` reads everything here without a cluster. Layout:

    STORAGE/NAME/sweep.json       identity: name, spec hash, code version, its tasks' plans
                                  (`orchestrator.worker.task.TaskPlan`: trials, then trunks)
    STORAGE/NAME/spec.yaml        the spec file as given when the sweep was created
    STORAGE/NAME/identity.json    each trial's defining config, to say what changed on a refusal
    STORAGE/NAME/state.json       live view of the driver: per-trial status, iteration, AP, attempts
    STORAGE/NAME/trials/TRIAL/    a task's folder: its files are `trainer.trial_dir.TrialDir`'s
    STORAGE/NAME/pretrain/JOB/    a pretrain job's output (backbone.pt) and its done.json
    STORAGE/NAME/tune/            Ray Tune's experiment folder (what `run` restores from)

On an object store (`storage_path: s3://...`) STORAGE/NAME is the driver's local mirror of the store
(`orchestrator.state.mirror`; Tune's experiment stays in the store) and the tasks train in each node's
scratch folder (`orchestrator.worker.store_sync`).

The sweep's identity is its name + spec hash; `ensure_same_spec` refuses a changed spec with the
keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import SpecChangedError, SweepNotFoundError
from orchestrator.sweep.expand import Expansion, flat_items
from orchestrator.worker.task import ERROR, FINISHED, PENDING, RUNNING, Branch, Fork, TaskPlan, read_plans  # noqa: F401
from orchestrator.views.view import Row
from orchestrator.worker.object_store import is_store_uri, split_uri
from trainer.atomic import write_atomic
from trainer.engine.schedule import resolve_schedule
from trainer.trial_dir import ATTEMPTS, SEGMENTS, TRUNK_DONE, TrialDir

RECORD = "sweep.json"
STATE = "state.json"


DEFAULT_CACHE = Path("/tmp/orchestrator")  # the spec's `local_cache` default


def sweep_dir_for(storage_path: Path | str, name: str, local_cache: Path = DEFAULT_CACHE) -> Path:
    """The sweep's folder: STORAGE/NAME on shared storage, the driver's mirror of it on an object store."""
    if is_store_uri(storage_path):
        scheme, root = split_uri(str(storage_path))
        return (Path(local_cache) / "mirror" / scheme / root / name).resolve()
    return (Path(storage_path) / name).resolve()


def scratch_dir_for(store_uri: str, local_cache: Path = DEFAULT_CACHE) -> Path:
    """Where every node trains an object-store sweep's tasks (`Task.store.scratch`): node-local disk."""
    scheme, root = split_uri(store_uri)
    return (Path(local_cache) / "scratch" / scheme / root).resolve()


def mirror(store_uri: str, local: Path) -> Any:
    """The driver's `orchestrator.state.mirror.SweepMirror` of an object-store sweep."""
    from orchestrator.state.mirror import SweepMirror
    from orchestrator.worker.object_store import ObjectStore

    return SweepMirror(ObjectStore.from_uri(store_uri), local)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, data: Any) -> None:
    """Atomic: readers (status, a second driver) never see half a file."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------
# Identity


def task_plans(exp: Expansion) -> list[TaskPlan]:
    """The plans of the expansion's tasks: its trials, then its trunks (what sweep.json stores)."""
    trunks = {k.trunk_id: k for k in exp.forks.trunks}
    names = {t.trial_id: t.name for t in exp.trials}
    branches = {tid: tuple(Branch(name=names[b], at=at) for b, at in k.forks.items()) for tid, k in trunks.items()}
    plans = []
    for t in exp.trials:
        plan = {"trial_id": t.trial_id, "name": t.name, "index": t.index, "axes": _axes_labels(t),
                "total": resolve_schedule(t.config.schedule).total_iters, "needs": t.needs}
        if t.trial_id in exp.forks.branches:
            trunk_id, at = exp.forks.branches[t.trial_id]
            plan.update(role="branch", fork=Fork(trunk_id=trunk_id, trunk=trunks[trunk_id].name, at=at),
                        branches=branches[trunk_id])
        plans.append(TaskPlan(**plan))
    plans += [TaskPlan(trial_id=k.trunk_id, name=k.name, role="trunk", index=k.index, total=k.stop, needs=k.needs,
                       axes={**_axes_labels(k), "schedule": "trunk"}, branches=branches[k.trunk_id])
              for k in exp.forks.trunks]
    return plans


def make_record(exp: Expansion, spec_text: str, code_version: str) -> dict[str, Any]:
    plans = [p.model_dump(mode="json") for p in task_plans(exp)]
    return {"name": exp.spec.name, "spec_hash": exp.spec_hash, "code_version": code_version,
            "created": time.time(), "cwd": os.getcwd(), "trials": plans[:len(exp.trials)],
            "trunks": plans[len(exp.trials):],
            "pretrain": [{"name": j.name, "job_id": j.job_id} for j in exp.pretrain],
            "spec_text": spec_text}


def _axes_labels(trial) -> dict[str, str]:
    """axis -> label, always with the four named axes (from the config where not an axis)."""
    out = {k: trial.labels[k] for k in ("init", "data", "schedule", "backbone")}
    out["init"] = trial.init
    out.update({a: str(v) for a, v in trial.axes.items() if a not in out})
    return out


def create_sweep(sweep_dir: Path, exp: Expansion, spec_text: str, code_version: str,
                 sets: list[str] | None = None) -> dict[str, Any]:
    record = make_record(exp, spec_text, code_version)
    if sets:  # the command line's `--set`s, which `resume` reapplies (orchestrator.sweep.sets)
        record["sets"] = list(sets)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "spec.yaml").write_text(spec_text)
    write_json(sweep_dir / "identity.json", exp.identities)
    write_json(sweep_dir / RECORD, record)
    return record


def read_record(sweep_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(sweep_dir) / RECORD)


def ensure_same_spec(sweep_dir: Path, record: dict[str, Any], exp: Expansion) -> None:
    """Refuse to resume a sweep from a spec that would run different trials."""
    if record["spec_hash"] == exp.spec_hash:
        return
    old = read_json(sweep_dir / "identity.json", {})
    changes = describe_changes(old, exp.identities)
    raise SpecChangedError(
        f"sweep {exp.spec.name!r} in {sweep_dir} was started from a different spec (hash {record['spec_hash']} "
        f"-> {exp.spec_hash}): {changes}. To keep the old sweep and start a new one, give the spec a new "
        f"name (e.g. name: {exp.spec.name}-v2); to throw the old one away, delete {sweep_dir}")


def describe_changes(old: dict[str, dict], new: dict[str, dict], limit: int = 4) -> str:
    """'optim.base_lr 0.02 -> 0.03 (8 trials); 2 trials added (a, b)' from two identity maps."""
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    diffs: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for name in new:
        if name not in old:
            continue
        a, b = dict(flat_items(old[name])), dict(flat_items(new[name]))
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.setdefault(key, set()).add(f"{_show(a.get(key))} -> {_show(b.get(key))}")
                counts[key] = counts.get(key, 0) + 1
    parts = [f"{k} {' / '.join(sorted(v)[:2])} ({counts[k]} trials)" for k, v in list(diffs.items())[:limit]]
    if len(diffs) > limit:
        parts.append(f"{len(diffs) - limit} more keys")
    for label, names in (("added", added), ("removed", removed)):
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{len(names)} trials {label} ({shown})")
    return "; ".join(parts) or "the pretrain jobs changed"


def _show(value: Any) -> str:
    return "default" if value is None else json.dumps(value)


def find_sweep_dir(target: str | Path) -> Path:
    """A sweep folder given itself (has sweep.json), its spec file (STORAGE/NAME) or its object-store root
    (s3://BUCKET/PREFIX/NAME: mirrored first into the default local cache)."""
    if is_store_uri(target):
        storage, _, name = str(target).rstrip("/").rpartition("/")
        return _pulled(str(target), sweep_dir_for(storage, name), str(target))
    path = Path(target)
    if path.is_dir() and (path / RECORD).exists():
        return path.resolve()
    if path.is_dir():
        raise SweepNotFoundError(f"{path}: not a sweep folder (no {RECORD})")
    from orchestrator.sweep.spec import load_spec

    spec = load_spec(path)
    folder = sweep_dir_for(spec.storage_path, spec.name, spec.local_cache)
    if spec.store_uri is not None:
        return _pulled(spec.store_uri, folder, str(target))
    if not (folder / RECORD).exists():
        raise SweepNotFoundError(f"sweep {spec.name!r} has not been started (no {folder / RECORD}); "
                                 f"start it with: python -m orchestrator run {target}")
    return folder


def pull_root(copy: Any) -> int:
    """`SweepMirror.pull_root`, its store's errors as one line (naming the credential variables set here)."""
    from orchestrator.errors import OrchestratorError
    from orchestrator.worker.object_store import credentials_hint

    try:
        return copy.pull_root()
    except Exception as exc:  # pyarrow's errors differ by store and version: all mean "cannot read it"
        raise OrchestratorError(f"cannot read the object store {copy.store.uri} ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); credentials set here: {credentials_hint()}") from None


def _pulled(store_uri: str, folder: Path, target: str) -> Path:
    """An object-store sweep's mirror, brought up to date from the store (`status`, `report`, `ui`)."""
    copy = mirror(store_uri, folder)
    if not pull_root(copy) or not (folder / RECORD).exists():
        raise SweepNotFoundError(f"no sweep at {store_uri} (no {RECORD} there); start it with: "
                                 f"python -m orchestrator run SPEC")
    copy.pull_trials()
    return folder


# ----------------------------------------------------------------------------------------------
# Progress


def trial_dir(sweep_dir: Path, name: str) -> TrialDir:
    return TrialDir.in_sweep(sweep_dir, name)


def task_rows(record: dict[str, Any]) -> list[TaskPlan]:
    """What runs: the record's trials, then its trunks (any version's rows, `orchestrator.worker.task.upgrade`)."""
    return read_plans(record)


def trunk_done(sweep_dir: Path, name: str, stop: int) -> bool:
    """A trunk is done once its checkpoint at its last fork point is on disk (or it was, and was pruned)."""
    folder = trial_dir(sweep_dir, name)
    return folder.has_marker(TRUNK_DONE) or folder.has_checkpoint(stop)


def metric_rows(sweep_dir: Path, name: str, upto: int | None = None) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) of a trial's metrics.jsonl, up to a step; a torn last line is skipped."""
    return trial_dir(sweep_dir, name).metric_rows(upto)


def trained_iterations(sweep_dir: Path, names: list[str]) -> int:
    """Iterations the tasks' processes trained: each attempt's segments row (start, end).

    An attempt killed outright (SIGKILL, a lost node) never writes its row; its work counts from
    where it started (its attempts row) to where it got: the next attempt's start (it resumes from the
    killed one's newest checkpoint), or, for the last attempt, the largest step of its checkpoints
    and metric rows.
    """
    total = 0
    for name in names:
        folder = trial_dir(sweep_dir, name)
        ended = {int(row["attempt"]): row for row in folder.rows(SEGMENTS) if "attempt" in row}
        started = [row for row in folder.rows(ATTEMPTS) if "start_iter" in row and "attempt" in row]
        for i, row in enumerate(started):
            seg = ended.pop(int(row["attempt"]), None)
            if seg is not None:
                total += max(int(seg.get("end", 0)) - int(seg.get("start", 0)), 0)
                continue
            start = int(row["start_iter"])
            end = int(started[i + 1]["start_iter"]) if i + 1 < len(started) else folder.reached()
            total += max(end - start, 0)
        for seg in ended.values():  # a segment row without its attempts row (older sweeps)
            total += max(int(seg.get("end", 0)) - int(seg.get("start", 0)), 0)
    return total


def preemptions(sweep_dir: Path, name: str) -> list[dict[str, Any]]:
    """A trial's attempts that stopped on a preemption notice: {"attempt", "preempted_at", "reason", ...}."""
    return [r for r in trial_dir(sweep_dir, name).rows(ATTEMPTS) if "preempted_at" in r]


def read_state(sweep_dir: Path) -> dict[str, Any]:
    return read_json(Path(sweep_dir) / STATE, {"trials": {}, "driver": {}})


def disk_progress(sweep_dir: Path, name: str, trunk_stop: int | None = None) -> dict[str, Any]:
    """What a trial's own folder says, for when the driver's state is stale (killed driver)."""
    folder = trial_dir(sweep_dir, name)
    out: dict[str, Any] = {}
    if trunk_stop is not None and trunk_done(sweep_dir, name, trunk_stop):
        return {"finished": True, "iteration": trunk_stop}
    final = folder.final()
    if final is not None:
        out["finished"] = True
        out.update({k: final.get(k) for k in ("bbox/AP", "segm/AP")})
        out["iteration"] = int(final.get("iteration") or 0)
        return out
    last_step, aps = 0, {}
    for step, row in folder.metric_rows():
        last_step = max(last_step, step)
        aps.update({k: row[k] for k in ("bbox/AP", "segm/AP") if k in row})
    out.update(aps)
    out["iteration"] = last_step
    return out


def pretrain_jobs(record: dict[str, Any]) -> list[str]:
    """The names of the sweep's pretrain jobs (sweep.json's "pretrain" rows: name, job id)."""
    return [str(job.get("name")) for job in record.get("pretrain", [])]


def pretrain_row(sweep_dir: Path, name: str) -> Row:
    """A pretrain job as a table row, from its folder: progress.json (`trainer.pretrain.train`), done.json."""
    from orchestrator.sweep.expand import pretrain_dir

    folder = pretrain_dir(sweep_dir, name)
    progress = read_json(folder / "progress.json", {})
    row = Row(name=f"pretrain:{name}", role="pretrain", total=int(progress.get("total") or 0),
              iteration=int(progress.get("iteration") or 0), status=PENDING)
    if (folder / "done.json").exists():
        row.status, row.iteration = FINISHED, row.total
    elif progress:
        row.status = RUNNING
        if progress.get("rate"):
            row.eta_s = (row.total - row.iteration) / progress["rate"]
    return row


def driver_alive(driver: dict[str, Any]) -> bool:
    """Whether the driver that wrote state.json still runs (only answerable on its own host)."""
    pid, host = driver.get("pid"), driver.get("host")
    if not pid or driver.get("finished"):
        return False
    if host != socket.gethostname():
        return True  # cannot look from here: trust the file
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def code_version(root: Path | None = None) -> str:
    """git commit (+ '-dirty'), else a hash of the trainer and orchestrator sources."""
    root = Path(root or Path(__file__).resolve().parents[2])
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode == 0 and rev.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "orchestrator"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for pkg in ("trainer", "orchestrator"):
        for path in sorted((root / pkg).glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return "src-" + digest.hexdigest()[:10]
