"""A sweep's folder on the storage path: its identity, its stored spec and its trials' progress.

Pure (no Ray, no MLflow): `status` reads everything here without a cluster. Layout:

    STORAGE/NAME/sweep.json       identity: name, spec hash, code version, trials (id, name, axes)
    STORAGE/NAME/spec.yaml        the spec file as given when the sweep was created
    STORAGE/NAME/identity.json    each trial's defining config, to say what changed on a refusal
    STORAGE/NAME/state.json       live view of the driver: per-trial status, iteration, AP, attempts
    STORAGE/NAME/trials/TRIAL/    the trainer's output folder (config.yaml, metrics.jsonl, checkpoints/);
                                  a trunk's too (schedule forking), a branch's fork.json, and
                                  diverged.json once a trial's loss went non-finite
    STORAGE/NAME/pretrain/JOB/    a pretrain job's output (backbone.pt) and its done.json
    STORAGE/NAME/tune/            Ray Tune's experiment folder (what `run` restores from)

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
from orchestrator.sweep.fork import checkpoint_file
from trainer.atomic import write_atomic
from trainer.engine.schedule import resolve_schedule

RECORD = "sweep.json"
STATE = "state.json"
DIVERGED = "diverged.json"  # in a trial's folder: the iteration and loss it diverged at
FINISHED, RUNNING, PENDING, ERROR = "FINISHED", "RUNNING", "PENDING", "ERROR"


def sweep_dir_for(storage_path: Path, name: str) -> Path:
    return (Path(storage_path) / name).resolve()


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, data: Any) -> None:
    """Atomic: readers (status, a second driver) never see half a file."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def record_divergence(folder: Path, error: Any) -> None:
    """Called in the trial (a NonFiniteLossError): the reason the driver shows, and a bar to retries."""
    data = {"iteration": int(error.iteration), "loss": str(error.loss), "message": str(error), "time": time.time()}
    write_json(Path(folder) / DIVERGED, data)


def recorded_divergence(folder: Path) -> Any | None:
    """The NonFiniteLossError recorded in a trial folder, or None."""
    from trainer.errors import NonFiniteLossError

    data = read_json(Path(folder) / DIVERGED)
    return NonFiniteLossError(int(data["iteration"]), float(data["loss"])) if data else None


# ----------------------------------------------------------------------------------------------
# Identity


def make_record(exp: Expansion, spec_text: str, code_version: str) -> dict[str, Any]:
    trials = []
    for t in exp.trials:
        sched = resolve_schedule(t.config.schedule)
        row = {"trial_id": t.trial_id, "name": t.name, "index": t.index, "axes": _axes_labels(t),
               "total_iters": sched.total_iters, "needs": list(t.needs)}
        if t.trial_id in exp.forks.branches:
            trunk_id, at = exp.forks.branches[t.trial_id]
            row["fork"] = {"trunk_id": trunk_id, "trunk": exp.forks.trunk(trunk_id).name, "at": at}
        trials.append(row)
    trunks = [{"trial_id": k.trunk_id, "name": k.name, "index": k.index, "role": "trunk",
               "axes": {**_axes_labels(k), "schedule": "trunk"}, "total_iters": k.stop, "needs": list(k.needs),
               "forks": dict(k.forks)} for k in exp.forks.trunks]
    return {"name": exp.spec.name, "spec_hash": exp.spec_hash, "code_version": code_version,
            "created": time.time(), "cwd": os.getcwd(), "trials": trials, "trunks": trunks,
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
    """A sweep folder given itself (has sweep.json) or its spec file (STORAGE/NAME)."""
    path = Path(target)
    if path.is_dir() and (path / RECORD).exists():
        return path.resolve()
    if path.is_dir():
        raise SweepNotFoundError(f"{path}: not a sweep folder (no {RECORD})")
    from orchestrator.sweep.spec import load_spec

    spec = load_spec(path)
    folder = sweep_dir_for(spec.storage_path, spec.name)
    if not (folder / RECORD).exists():
        raise SweepNotFoundError(f"sweep {spec.name!r} has not been started (no {folder / RECORD}); "
                                 f"start it with: python -m orchestrator run {target}")
    return folder


# ----------------------------------------------------------------------------------------------
# Progress


def trial_dir(sweep_dir: Path, name: str) -> Path:
    return Path(sweep_dir) / "trials" / name


def task_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """What runs: the record's trials, then its trunks (schedule forking; none in older records)."""
    return list(record["trials"]) + list(record.get("trunks", []))


def trunk_done(sweep_dir: Path, name: str, stop: int) -> bool:
    """A trunk is done once its checkpoint at its last fork point is on disk (or it was, and was pruned)."""
    folder = trial_dir(sweep_dir, name)
    return (folder / "trunk_done.json").exists() or checkpoint_file(folder, stop).exists()


def metric_rows(sweep_dir: Path, name: str, upto: int | None = None) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) of a trial's metrics.jsonl, up to a step; a torn last line is skipped."""
    out = []
    try:
        text = (trial_dir(sweep_dir, name) / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if upto is None or step <= upto:
            out.append((step, row))
    return out


def trained_iterations(sweep_dir: Path, names: list[str]) -> int:
    """Iterations the tasks' processes trained: each attempt's segments.jsonl row (start, end).

    An attempt killed outright (SIGKILL, a lost node) never writes its row; its work counts from
    where it started (attempts.jsonl) to where it got: the next attempt's start (it resumes from the
    killed one's newest checkpoint), or, for the last attempt, the largest step of its checkpoints
    and metric rows.
    """
    total = 0
    for name in names:
        folder = trial_dir(sweep_dir, name)
        ended = {int(row["attempt"]): row for row in _lines(folder / "segments.jsonl") if "attempt" in row}
        started = [row for row in _lines(folder / "attempts.jsonl") if "start_iter" in row and "attempt" in row]
        for i, row in enumerate(started):
            seg = ended.pop(int(row["attempt"]), None)
            if seg is not None:
                total += max(int(seg.get("end", 0)) - int(seg.get("start", 0)), 0)
                continue
            start = int(row["start_iter"])
            end = int(started[i + 1]["start_iter"]) if i + 1 < len(started) else _reached(folder)
            total += max(end - start, 0)
        for seg in ended.values():  # a segment row without its attempts.jsonl row (older sweeps)
            total += max(int(seg.get("end", 0)) - int(seg.get("start", 0)), 0)
    return total


def _reached(folder: Path) -> int:
    """The largest step a trial folder shows: its newest checkpoint or its last metric row."""
    steps = [int(p.name[5:-3]) for p in (folder / "checkpoints").glob("ckpt_*.pt") if p.name[5:-3].isdigit()]
    steps += [int(row["step"]) for row in _lines(folder / "metrics.jsonl") if "step" in row]
    return max(steps, default=0)


def attempt_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines record (attempts.jsonl, segments.jsonl); a torn line is skipped."""
    return _lines(path)


def preemptions(sweep_dir: Path, name: str) -> list[dict[str, Any]]:
    """A trial's attempts that stopped on a preemption notice: {"attempt", "preempted_at", "reason", ...}."""
    return [r for r in _lines(trial_dir(sweep_dir, name) / "attempts.jsonl") if "preempted_at" in r]


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_state(sweep_dir: Path) -> dict[str, Any]:
    return read_json(Path(sweep_dir) / STATE, {"trials": {}, "driver": {}})


def disk_progress(sweep_dir: Path, name: str, trunk_stop: int | None = None) -> dict[str, Any]:
    """What a trial's own folder says, for when the driver's state is stale (killed driver)."""
    folder = trial_dir(sweep_dir, name)
    out: dict[str, Any] = {}
    if trunk_stop is not None and trunk_done(sweep_dir, name, trunk_stop):
        return {"finished": True, "iteration": trunk_stop}
    final = read_json(folder / "final_metrics.json")
    if final is not None:
        out["finished"] = True
        out.update({k: final.get(k) for k in ("bbox/AP", "segm/AP")})
        out["iteration"] = int(final.get("iteration") or 0)
        return out
    last_step, aps = 0, {}
    path = folder / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            last_step = max(last_step, int(row.get("step", 0)))
            aps.update({k: row[k] for k in ("bbox/AP", "segm/AP") if k in row})
    out.update(aps)
    out["iteration"] = last_step
    return out


def pretrain_row(sweep_dir: Path, name: str) -> dict[str, Any]:
    """A pretrain job as a table row, from its folder: progress.json (`trainer.pretrain`), done.json."""
    from orchestrator.sweep.expand import pretrain_dir

    folder = pretrain_dir(sweep_dir, name)
    progress = read_json(folder / "progress.json", {})
    row: dict[str, Any] = {"name": f"pretrain:{name}", "role": "pretrain", "total": int(progress.get("total") or 0),
                           "iteration": int(progress.get("iteration") or 0), "status": PENDING}
    if (folder / "done.json").exists():
        row.update(status=FINISHED, iteration=row["total"])
    elif progress:
        row["status"] = RUNNING
        if progress.get("rate"):
            row["eta_s"] = (row["total"] - row["iteration"]) / progress["rate"]
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
