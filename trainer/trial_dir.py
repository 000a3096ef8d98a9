"""A trial's folder: the one owner of every file in it, and its one reader of metrics.jsonl.

The folder is the contract between the trainer (which writes the record of a run), the orchestrator's
worker (attempts, markers, lock), its driver (which tails the metrics into MLflow and reads progress)
and the dashboards. Each file has one name, spelled here only:

    metrics.jsonl        one JSON row per report: {"step": i, metric: value, ...}   (`metric_rows`, `tail`)
    final_metrics.json   the last evaluation and samples seen, once training ended  (`final`)
    config.yaml          the resolved config the run trained with                    (`config_file`)
    train_image_ids.txt  the training subset's image ids                             (`write_image_ids`)
    train.log            the log of every attempt (the orchestrator's worker)        (`log_file`)
    attempts.jsonl       one row per attempt (where, from which iteration), plus preemption rows
    segments.jsonl       one row per attempt that ended: the iterations it trained (start, end)
    gang.jsonl           a DDP trial's ranks: where each trained
    fork.json            a schedule branch: the trunk checkpoint it first started from
    trunk_done.json      a trunk: done (it also is once its checkpoint at its last fork point exists)
    diverged.json        the iteration and loss a trial diverged at (a bar to retries)
    trial.lock           held by the one process that trains in the folder
    checkpoints/         `trainer.engine.checkpoint` names and lists the files in it
    model_final.pt       a finished trial's weights, when its checkpoints were replaced by them

Storage seam (issue 25: object storage): callers speak of records, rows, markers and checkpoints,
never of open file handles: `metric_rows`/`tail` hand out parsed rows, `add_row`/`rows` append and
read JSON-lines records by kind, `mark`/`marker` write and read small JSON markers, `checkpoint`/
`checkpoints` go through `trainer.engine.checkpoint`. Only `path` (and the few methods that return a Path
for a library that wants one: the config file for MLflow's artifact upload, a checkpoint for
torch) expose the POSIX layout. On object storage (`orchestrator.worker.store_sync`) the folder is a
node-local copy of the store's view: the same files, plus a manifest beside each checkpoint the
store has committed and this copy has not fetched (`has_checkpoint`, `committed_checkpoints`).

Pure: JSON and the file system only (no torch: `trainer.engine.checkpoint` imports it where it loads).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from trainer.atomic import write_atomic

METRICS = "metrics.jsonl"
FINAL = "final_metrics.json"
CONFIG = "config.yaml"
IMAGE_IDS = "train_image_ids.txt"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model_final.pt"
LOCK = "trial.lock"
# Beside a big file on object storage (`orchestrator.worker.object_store`): its size and sha256, written
# after the file; a folder mirrored from a store holds just this for a checkpoint it has not fetched.
MANIFEST = ".manifest.json"
# JSON-lines records (append-only) and JSON markers, by kind
ATTEMPTS, SEGMENTS, GANG = "attempts", "segments", "gang"
FORK, TRUNK_DONE, DIVERGED = "fork", "trunk_done", "diverged"
_RECORDS = {ATTEMPTS: "attempts.jsonl", SEGMENTS: "segments.jsonl", GANG: "gang.jsonl"}
_MARKERS = {FORK: "fork.json", TRUNK_DONE: "trunk_done.json", DIVERGED: "diverged.json"}

Row = tuple[int, dict[str, Any]]


def file_name(kind: str) -> str:
    """The file of a record or marker kind (`ATTEMPTS`, `TRUNK_DONE`, ...) in a trial's folder."""
    return {**_RECORDS, **_MARKERS}[kind]


def parse_metric_rows(data: bytes, upto: int | None = None) -> list[Row]:
    """The one parser of metrics.jsonl: (step, metrics) of each complete, readable row, up to a step."""
    rows = []
    for line in data.splitlines():
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue  # a torn or foreign line
        if upto is None or step <= upto:
            rows.append((step, row))
    return rows


class MetricTail:
    """New complete rows of one metrics.jsonl since the last committed read (a replaced file: from the top).

    `read` then `commit` once the rows are safely elsewhere: a failed consumer reads them again.
    """

    def __init__(self, path: Path, upto: int | None):
        self.path, self.upto = path, upto
        self.inode, self.offset = None, 0
        self._next: tuple[Any, int] | None = None

    def read(self) -> list[Row]:
        try:
            with open(self.path, "rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                start = self.offset if inode == self.inode else 0  # a resume rewrites the file (`keep_metrics`)
                fh.seek(start)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a torn last line waits for the next pass
        self._next = (inode, start + end)
        return parse_metric_rows(data[:end], self.upto)

    def commit(self) -> None:
        if self._next is not None:
            self.inode, self.offset = self._next


class TrialDir:
    """One trial's (or trunk's) folder; see the module docstring for its files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def in_sweep(cls, sweep_dir: str | Path, name: str) -> "TrialDir":
        """A task's folder in a sweep folder (the trainer's runtime.output_dir there)."""
        return cls(Path(sweep_dir) / "trials" / name)

    @property
    def name(self) -> str:
        return self.path.name

    def sibling(self, name: str) -> "TrialDir":
        """Another task's folder of the same sweep (a branch's trunk, a trunk's branches)."""
        return TrialDir(self.path.parent / name)

    def make(self) -> "TrialDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # -- metrics ------------------------------------------------------------------------------
    def metric_rows(self, upto: int | None = None) -> list[Row]:
        """(step, metrics) of every readable row, up to a step; a torn last line is skipped."""
        try:
            return parse_metric_rows(self._file(METRICS).read_bytes(), upto)
        except FileNotFoundError:
            return []

    def tail(self, upto: int | None = None) -> MetricTail:
        return MetricTail(self._file(METRICS), upto)

    def append_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with self._file(METRICS).open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def keep_metrics(self, keep: Callable[[int, dict[str, Any]], bool]) -> None:
        """Rewrite metrics.jsonl with the rows `keep(step, metrics)` accepts (unreadable rows go)."""
        if self._file(METRICS).exists():
            kept = [(s, m) for s, m in self.metric_rows() if keep(s, m)]
            write_atomic(self._file(METRICS), "".join(json.dumps({"step": s, **m}) + "\n" for s, m in kept))

    def last_step(self) -> int:
        return max((s for s, _ in self.metric_rows()), default=0)

    # -- final metrics, config ----------------------------------------------------------------
    def final(self) -> dict[str, Any] | None:
        """final_metrics.json, or None while the trial has not finished."""
        return _read_json(self._file(FINAL))

    def finished(self) -> bool:
        return self._file(FINAL).exists()

    def write_final(self, final: dict[str, Any]) -> None:
        write_atomic(self._file(FINAL), json.dumps(final, indent=2, sort_keys=True))

    def config_file(self) -> Path:
        return self._file(CONFIG)

    def final_file(self) -> Path:
        """For MLflow's artifact upload, which takes files."""
        return self._file(FINAL)

    def log_file(self) -> Path:
        """For a `logging.FileHandler`, which takes a file."""
        return self._file(LOG)

    def write_image_ids(self, ids: list[Any]) -> None:
        self._file(IMAGE_IDS).write_text("".join(f"{i}\n" for i in ids))

    # -- records (JSON lines) and markers (JSON) ----------------------------------------------
    def add_row(self, kind: str, row: dict[str, Any]) -> None:
        with self._file(_RECORDS[kind]).open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """A record's rows in order; a torn line is skipped."""
        try:
            text = self._file(_RECORDS[kind]).read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def mark(self, kind: str, data: dict[str, Any]) -> None:
        write_atomic(self._file(_MARKERS[kind]), json.dumps(data, indent=1, sort_keys=True, default=str))

    def marker(self, kind: str) -> dict[str, Any] | None:
        return _read_json(self._file(_MARKERS[kind]))

    def has_marker(self, kind: str) -> bool:
        return self._file(_MARKERS[kind]).exists()

    @contextmanager
    def lock(self, timeout: float = 300.0) -> Iterator[None]:
        """One process per trial folder: an attempt orphaned by a killed driver must be gone first."""
        fh = open(self._file(LOCK), "a+")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.path} is locked by another process for {timeout:.0f}s") from None
                    time.sleep(1.0)
            yield
        finally:
            fh.close()

    # -- checkpoints (named by trainer.engine.checkpoint) --------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, iteration: int) -> Path:
        from trainer.engine.checkpoint import checkpoint_path

        return checkpoint_path(self.checkpoint_dir, iteration)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(iteration, path) of every checkpoint, oldest first."""
        from trainer.engine.checkpoint import list_checkpoints

        return list_checkpoints(self.checkpoint_dir)

    def weights_file(self) -> Path:
        return self._file(WEIGHTS)

    def has_checkpoint(self, iteration: int) -> bool:
        """On disk here, or committed in the sweep's object store (its manifest here)."""
        return checkpoint_exists(self.checkpoint(iteration))

    def committed_checkpoints(self) -> list[int]:
        """Iterations of the checkpoints on disk here or committed in the store (manifests here)."""
        names = {p.name.removesuffix(MANIFEST) for p in self.checkpoint_dir.glob(f"*.pt{MANIFEST}")}
        found = {it for it, _ in self.checkpoints()}
        return sorted(found | {it for it in map(_iteration, names) if it is not None})

    def reached(self) -> int:
        """The largest step the folder shows: its newest checkpoint or its last metric row."""
        return max(self.committed_checkpoints() + [self.last_step()], default=0)

    def _file(self, name: str) -> Path:
        return self.path / name


def checkpoint_exists(path: str | Path) -> bool:
    """A checkpoint file is on disk, or committed in the object store (its manifest is)."""
    return os.path.exists(path) or os.path.exists(f"{path}{MANIFEST}")


def _iteration(name: str) -> int | None:
    from trainer.engine.checkpoint import iteration_of

    return iteration_of(name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
