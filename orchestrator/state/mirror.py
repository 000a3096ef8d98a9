"""The driver's copy of an object-store sweep: the local folder the driver, `status`, `report` and `ui` read.

With `storage_path: s3://...` the sweep's truth is in the store (`orchestrator.worker.store_sync` says
what the trials write there). The driver works in a local mirror folder (`SWEEP` in
`orchestrator.state.folder`'s layout) and keeps it in step from a thread:

- its own files (sweep.json, spec.yaml, identity.json, state.json, driver.log: the folder's top level)
  go up whenever they change (`push_root`), and come down first when `run`/`resume`/`status` find a
  mirror without them, on another machine or after the whole cluster was lost (`pull_root`);
- each task's small files come down from the newest stream that has them, its metric chunks are
  appended to its metrics.jsonl (rewritten whole when a newer attempt or generation takes over, as a
  resume on shared storage rewrites it), and each committed checkpoint is mirrored as its manifest
  only (`TrialDir.has_checkpoint` counts it; the bytes stay in the store) (`pull_trials`).
Tune keeps its experiment in the store itself (`storage_path` of its run config); nothing here.
The driver only reads the trials' keys: it never writes into a trial's prefix.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.worker.object_store import ObjectStore, periodic
from orchestrator.state.driver_log import LOG_NAME
from orchestrator.worker.store_sync import CLOSED, LOG_PUSH_S, committed, newest_view
from trainer.atomic import write_atomic
from trainer.trial_dir import FINAL, MANIFEST, METRICS, TRUNK_DONE, file_name

logger = logging.getLogger(__name__)
# A task's files that say it has ended: a trial's final metrics, a trunk's marker, a pretrain job's.
ENDED = {FINAL, file_name(TRUNK_DONE), "done.json"}


class SweepMirror:
    """A sweep's objects (`store`, rooted at the sweep) mirrored into `local` (see the module docstring)."""

    def __init__(self, store: ObjectStore, local: str | Path):
        self.store, self.local = store, Path(local)
        self.fetched: dict[str, tuple[int, int]] = {}  # key -> (size, mtime) of the copy here
        self.streams: dict[str, tuple[str, list[str]]] = {}  # task -> (its metrics' generation, chunks appended)
        self.pushed: dict[str, tuple[int, int]] = {}
        self.ended: set[str] = set()  # tasks whose end this mirror has (`pull_trials`)
        self._log_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- the driver's own files -----------------------------------------------------------------
    def pull_root(self) -> int:
        """The sweep's top-level files from the store (none: a sweep not started yet); returns how many."""
        found = self.store.list("", recursive=False)
        for key in found:
            data = self.store.get_bytes(key)
            if data is not None:
                write_atomic(self.local / key, data)
                st = (self.local / key).stat()
                self.pushed[key] = (st.st_size, st.st_mtime_ns)  # this copy is the store's already
        return len(found)

    def push_root(self, final: bool = False) -> None:
        for path in sorted(self.local.iterdir()) if self.local.is_dir() else ():
            if not path.is_file() or path.name.startswith("."):
                continue
            st = path.stat()
            if self.pushed.get(path.name) == (st.st_size, st.st_mtime_ns):
                continue
            if path.name == LOG_NAME and not final and time.monotonic() - self._log_at < LOG_PUSH_S:
                continue  # the driver's log grows all sweep long and goes up whole: not every pass
            self.store.put_bytes(path.name, path.read_bytes())
            self.pushed[path.name] = (st.st_size, st.st_mtime_ns)
            self._log_at = time.monotonic() if path.name == LOG_NAME else self._log_at

    # -- the tasks' folders ---------------------------------------------------------------------
    def pull_trials(self) -> None:
        """Every task's folder (trials/NAME) and pretrain job's (pretrain/NAME: its done.json, its backbone).

        A task that has ended (final metrics, trunk-done or done marker) is listed no more after the pass
        that saw it end: a paper grid's finished trials hold thousands of chunks."""
        for kind in ("trials", "pretrain"):
            for name in self.store.folders(kind):
                prefix = f"{kind}/{name}"
                if prefix not in self.ended:
                    self._pull_task(prefix, self.store.list(prefix))

    def _pull_task(self, prefix: str, listing: dict[str, Any]) -> None:
        folder = self.local / prefix
        files, chunks = newest_view(listing, prefix)
        for fname, key in files.items():
            self._fetch(key, listing[key], folder / fname)
        for fname in ENDED & set(files):  # ended, and the attempt that ended it pushed its last rows
            if files[fname].rsplit("/files/", 1)[0] + f"/{CLOSED}" in listing:
                self.ended.add(prefix)
        self._pull_metrics(prefix, folder, chunks)
        wanted = {folder / f"{rel}{MANIFEST}" for rel in committed(listing, prefix)}
        for path in wanted:
            if not path.exists():
                write_atomic(path, b"{}")  # presence is what counts; the manifest itself stays in the store
        for path in folder.glob(f"**/*.pt{MANIFEST}"):
            if path not in wanted:
                path.unlink(missing_ok=True)  # pruned in the store

    def _fetch(self, key: str, stamp: tuple[int, int], dest: Path) -> None:
        if self.fetched.get(key) == tuple(stamp) and dest.exists():
            return
        data = self.store.get_bytes(key)
        if data is not None:
            write_atomic(dest, data)
            self.fetched[key] = tuple(stamp)

    def _pull_metrics(self, name: str, folder: Path, chunks: list[str]) -> None:
        if not chunks:
            return
        generation = chunks[0].rsplit("-", 1)[0]  # .../streams/STREAM/metrics/GG
        known_gen, known = self.streams.get(name, ("", []))
        if generation == known_gen and chunks[:len(known)] == known:
            new = chunks[len(known):]
            if new:
                with open(folder / METRICS, "ab") as fh:  # same file: the MLflow tail reads on from its offset
                    for key in new:
                        fh.write(self.store.get_bytes(key) or b"")
        else:  # a newer attempt or generation: the whole file anew (the tail reads it from the top)
            write_atomic(folder / METRICS, b"".join(self.store.get_bytes(k) or b"" for k in chunks))
        self.streams[name] = (generation, list(chunks))

    # -- in step, from a thread -----------------------------------------------------------------
    def sync(self, final: bool = False) -> None:
        with self._lock:
            self.push_root(final)
            self.pull_trials()

    def start(self, interval: float = 2.0) -> "SweepMirror":
        self._thread = periodic(self.sync, interval, self._stop, "store-mirror", self.store.uri)
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync(final=True)
