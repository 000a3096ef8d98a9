"""An object-store sweep on the worker side: a trial trains in node-local scratch, replicated to the store.

Every node trains in its own scratch folder (`Task.store.scratch`); the store holds the truth. Keys
under the sweep's root, for a task NAME:

    trials/NAME/checkpoints/ckpt_NNNNNNN.pt (+ .manifest.json)   committed objects (`ObjectStore.put_file`);
    trials/NAME/model_final.pt (+ .manifest.json)                  the same for any other *.pt
    trials/NAME/streams/STREAM/metrics/GG-SSSSSS.jsonl             immutable metric chunks
    trials/NAME/streams/STREAM/files/FILE                          the stream's copy of each small file

A *stream* is what one attempt writes: "AAAA.TOKEN" (attempt number, then a random token), so two
processes never write the same key: no lock is needed, and a zombie attempt (a lost node that still
runs) writes only under its own stream. Readers take each small file from the newest stream that has
it and the metric rows from the newest stream that has chunks (`newest_view`): a newer attempt fences
an older one off. Within a stream, a rewrite of metrics.jsonl (a resume drops rows past its checkpoint)
starts a new generation GG whose chunk 0 holds the whole file, so a generation is complete on its own.

Order of a push (`TrialSync.push`): read the changed small files, note the checkpoints on disk, push the
metric rows, upload those checkpoints (then delete in the store those pruned here), then the small
files as read. The trainer writes a
step's rows before its checkpoint, so a committed checkpoint never has rows missing before it (a resume
from it leaves no gap in the curve); and a marker (final metrics, trunk done) never reaches the store
before the checkpoints it vouches for (a new attempt would skip the task, its checkpoints lost).

`pull_trial` makes a scratch folder equal to the store's view before an attempt: small files and
metrics from the newest streams, every committed checkpoint (verified; a local one the store has not
committed is dropped: scratch is never ahead of the store), or only their manifests for a folder the
process reads but does not train in.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.worker.object_store import ObjectStore, hexdigest, periodic
from trainer.atomic import write_atomic
from trainer.trial_dir import LOG, LOCK, MANIFEST, METRICS, TrialDir

logger = logging.getLogger(__name__)

BIG = ".pt"
PUSH_INTERVAL_S = 2.0
LOG_PUSH_S = 30.0
CLOSED = "closed"  # the last object of a stream: its attempt pushed everything
METRICS_PUSH_S = 10.0  # and with every new checkpoint, and at the attempt's end


def trial_key(name: str) -> str:
    return f"trials/{name}"


def newest_view(listing: dict[str, Any], prefix: str) -> tuple[dict[str, str], list[str]]:
    """From a listing of a trial's keys: (file name -> key of its newest copy, metric chunk keys in order)."""
    files: dict[str, tuple[str, str]] = {}
    chunks: dict[str, dict[str, list[str]]] = {}
    head = f"{prefix}/streams/"
    for key in listing:
        if not key.startswith(head):
            continue
        stream, _, rest = key[len(head):].partition("/")
        kind, _, name = rest.partition("/")
        if kind == "files" and name:
            if name not in files or stream > files[name][0]:
                files[name] = (stream, key)
        elif kind == "metrics" and name.endswith(".jsonl"):
            gen = name[:-6].partition("-")[0]
            chunks.setdefault(stream, {}).setdefault(gen, []).append(key)
    rows: list[str] = []
    if chunks:
        gens = chunks[max(chunks)]
        keys = sorted(gens[max(gens)])
        for i, key in enumerate(keys):  # contiguous from chunk 0 (a listing may not show the newest yet)
            if not key.endswith(f"-{i:06d}.jsonl"):
                break
            rows.append(key)
    return {name: key for name, (_, key) in files.items()}, rows


def committed(listing: dict[str, Any], prefix: str) -> list[str]:
    """Keys (relative to the trial) of the big objects under `prefix` that have a manifest."""
    out = []
    for key in listing:
        if key.startswith(prefix + "/") and key.endswith(BIG + MANIFEST) and "/streams/" not in key:
            out.append(key[len(prefix) + 1:-len(MANIFEST)])
    return sorted(out)


def pull_trial(store: ObjectStore, name: str, folder: str | Path, checkpoints: str = "all",
               prefix: str | None = None) -> dict[str, Any]:
    """Make `folder` the store's view of task `name` (or of the folder at key `prefix`: a pretrain job's);
    `checkpoints`: "all" (verified bytes) or "manifests" (a manifest file beside where each would be:
    `TrialDir.has_checkpoint` counts them). Returns what it did."""
    folder, prefix = Path(folder), prefix or trial_key(name)
    listing = store.list(prefix)
    files, chunks = newest_view(listing, prefix)
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.rglob("*"):  # scratch is a cache of the store: nothing of its own survives a pull
        if path.is_file() and not path.name.endswith(BIG) and path.name != LOCK:
            path.unlink()
    for fname, key in files.items():
        data = store.get_bytes(key)
        if data is not None:
            write_atomic(folder / fname, data)
    if chunks:
        write_atomic(folder / METRICS, b"".join(store.get_bytes(k) or b"" for k in chunks))
    got, dropped = _pull_big(store, listing, prefix, folder, checkpoints)
    return {"files": len(files), "chunks": len(chunks), "big": got, "dropped": dropped}


def _pull_big(store: ObjectStore, listing: dict[str, Any], prefix: str, folder: Path,
              which: str) -> tuple[list[str], list[str]]:
    wanted = committed(listing, prefix)
    got, dropped = [], []
    for path in list(folder.rglob(f"*{BIG}")):  # a local one the store has not committed goes
        rel = path.relative_to(folder).as_posix()
        if rel not in wanted or which != "all":
            path.unlink()
            dropped.append(rel)
    for rel in wanted:
        local = folder / rel
        if which == "manifests":
            write_atomic(local.with_name(local.name + MANIFEST), store.get_bytes(f"{prefix}/{rel}{MANIFEST}") or b"")
        elif fetch(store, f"{prefix}/{rel}", local):
            got.append(rel)
    return got, dropped


def fetch(store: ObjectStore, key: str, local: Path) -> bool:
    """A committed object at `local`, verified: kept if this node has it already, else downloaded."""
    manifest = store.manifest(key)
    if manifest is None:
        return False
    if local.exists() and local.stat().st_size == manifest["size"] and hexdigest(local) == manifest["sha256"]:
        return True  # an earlier attempt on this node (or another task of the sweep) fetched it
    if store.get_verified(key, local, manifest):
        return True
    local.unlink(missing_ok=True)
    return False


class TrialSync:
    """Pushes one attempt's trial folder to the store: periodically from a thread, and whole at `close`."""

    def __init__(self, store: ObjectStore, folder: TrialDir, attempt: int, prefix: str | None = None):
        self.store, self.folder, self.prefix = store, folder, prefix or trial_key(folder.name)
        # After every stream in the store, even one whose attempt died before its attempts row went up.
        head = f"{self.prefix}/streams/"
        streams = {k[len(head):].split("/")[0] for k in store.list(head.rstrip("/")) if k.startswith(head)}
        number = max([attempt] + [int(s.split(".")[0]) + 1 for s in streams if s.split(".")[0].isdigit()])
        self.stream = f"{number:04d}.{secrets.token_hex(4)}"
        self.pushed: dict[str, tuple[int, int]] = {}  # small file -> (size, mtime) pushed
        done = set(committed(store.list(self.prefix), self.prefix))
        # Big files here that the store has committed (a pull just fetched them): not uploaded again.
        self.big = {rel: stamp for rel, stamp in self._big_here(folder).items() if rel in done}
        self.inode, self.offset, self.gen, self.seq = None, 0, -1, 0
        self.uploads: list[tuple[str, int, float]] = []  # (key, bytes, seconds): the upload cost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._push_lock = threading.Lock()
        self._log_at = self._rows_at = 0.0

    @staticmethod
    def _big_here(folder: TrialDir) -> dict[str, tuple[int, int]]:
        out = {}
        for path in folder.path.rglob(f"*{BIG}") if folder.path.exists() else ():
            st = path.stat()
            out[path.relative_to(folder.path).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def start(self, interval: float = PUSH_INTERVAL_S) -> "TrialSync":
        self._thread = periodic(self.push, interval, self._stop, "store-push", self.store.uri)
        return self

    def close(self) -> None:
        """Stop the thread and push what is left (an error here fails the attempt: nothing may be lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.push(final=True)
        self.store.put_bytes(f"{self.prefix}/streams/{self.stream}/{CLOSED}", b"")  # nothing more comes

    def push(self, final: bool = False) -> None:
        with self._push_lock:
            # Read in this order, sent in the reverse: a marker (final metrics, trunk done) read here was
            # written after the checkpoints it vouches for, which the listing below then sees and which go
            # up before it (else a new attempt could skip a task whose checkpoints are lost); rows
            # written before a checkpoint go up before it (a resume from it leaves no gap in the curve).
            files = self._changed_files(final)
            on_disk = self._big_here(self.folder)
            new_big = any(self.big.get(rel) != stamp for rel, stamp in on_disk.items())
            if final or new_big or time.monotonic() - self._rows_at >= METRICS_PUSH_S:
                self._push_metrics()  # a chunk per METRICS_PUSH_S at most: listings stay short
            self._push_big(on_disk)
            for name, (stamp, data) in files.items():
                self.store.put_bytes(self._stream_key("files", name), data)
                self.pushed[name] = stamp
                self._log_at = time.monotonic() if name == LOG else self._log_at

    def _stream_key(self, kind: str, name: str) -> str:
        return f"{self.prefix}/streams/{self.stream}/{kind}/{name}"

    def _push_metrics(self) -> None:
        path = self.folder.path / METRICS
        try:
            with open(path, "rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                if inode != self.inode:  # first push, or the file was rewritten: a new generation
                    self.inode, self.offset, self.gen, self.seq = inode, 0, self.gen + 1, 0
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        data = data[:data.rfind(b"\n") + 1]  # a torn last line waits
        self._rows_at = time.monotonic()
        if data or self.seq == 0:
            self.store.put_bytes(self._stream_key("metrics", f"{self.gen:02d}-{self.seq:06d}.jsonl"), data)
            self.offset += len(data)
            self.seq += 1

    def _changed_files(self, final: bool) -> dict[str, tuple[tuple[int, int], bytes]]:
        """The small files changed since their last push: name -> ((size, mtime), bytes)."""
        out = {}
        for path in sorted(self.folder.path.iterdir()) if self.folder.path.exists() else ():
            name = path.name
            if not path.is_file() or name.startswith(".") or name in (METRICS, LOCK) or name.endswith(BIG) \
                    or name.endswith(MANIFEST):
                continue
            st = path.stat()
            if self.pushed.get(name) == (st.st_size, st.st_mtime_ns):
                continue
            if name == LOG and not final and time.monotonic() - self._log_at < LOG_PUSH_S:
                continue  # the log is uploaded whole: every LOG_PUSH_S, and at the attempt's end
            out[name] = ((st.st_size, st.st_mtime_ns), path.read_bytes())
        return out

    def _push_big(self, on_disk: dict[str, tuple[int, int]]) -> None:
        known, prefix = self.big, self.prefix
        for rel, stamp in sorted(on_disk.items()):
            if known.get(rel) == stamp:
                continue
            t0 = time.perf_counter()
            try:
                manifest = self.store.put_file(self.folder.path / rel, f"{prefix}/{rel}")
            except FileNotFoundError:
                continue  # pruned between the listing and the upload
            self.uploads.append((rel, manifest["size"], time.perf_counter() - t0))
            logger.info("uploaded %s/%s (%.1f MB in %.2f s)", prefix, rel, manifest["size"] / 1e6,
                        self.uploads[-1][2])
            known[rel] = stamp
        for rel in sorted(set(known) - set(on_disk)):  # pruned here since: pruned in the store, after the
            self.store.delete_committed(f"{prefix}/{rel}")  # uploads (the store never holds fewer than here)
            del known[rel]

    def upload_cost(self) -> dict[str, float]:
        """The checkpoints this attempt uploaded: count, MB and seconds (recorded in its segments row)."""
        ckpts = [(b, s) for rel, b, s in self.uploads if rel.startswith("checkpoints/")]
        return {"uploads": len(ckpts), "upload_mb": round(sum(b for b, _ in ckpts) / 1e6, 3),
                "upload_s": round(sum(s for _, s in ckpts), 3)}


# ----------------------------------------------------------------------------------------------
# One attempt of a task on object storage (`orchestrator.worker.trainable`)


def open_store(task: Any) -> ObjectStore | None:
    """The sweep's store of an object-store task (`Task.store`, or a `StoreRef` itself), or None: the
    sweep folder is shared."""
    ref = getattr(task, "store", task)
    return ObjectStore.from_uri(ref.uri) if ref is not None else None


def fetch_fork(store: ObjectStore, task: Any) -> Path | None:
    """A branch's fork checkpoint, fetched from its trunk's committed objects and verified, or None."""
    source = task.fork_checkpoint()
    key = f"{trial_key(task.fork.trunk)}/{source.parent.name}/{source.name}"
    dest = task.fork_copy()
    return dest if fetch(store, key, dest) else None


def fetch_init(store: ObjectStore, task: Any) -> None:
    """The checkpoint a task's model starts from when the sweep made it (a pretrain job's backbone, in
    this node's scratch after `Task.on_node`): fetched once per node, verified."""
    init = task.config.model.init
    path = Path(init.removeprefix("checkpoint:"))
    if init.startswith("checkpoint:") and path.is_relative_to(task.store.scratch) and \
            not fetch(store, task.store.key(path), path):
        logger.warning("%s is not in the store %s (yet): the trial will fail on it", path, store.uri)


def finish_sync(sync: TrialSync, attempt: int) -> None:
    """The attempt's last push, with its upload cost in attempts.jsonl (pushed with it)."""
    from trainer.trial_dir import ATTEMPTS

    try:
        sync.push(final=True)  # first: the cost row covers every upload
        cost = sync.upload_cost()
        if cost["uploads"]:
            sync.folder.add_row(ATTEMPTS, {"attempt": attempt, "store": sync.store.uri, **cost, "time": time.time()})
            logger.info("attempt %d uploaded %d checkpoint(s), %.1f MB in %.1f s", attempt, cost["uploads"],
                        cost["upload_mb"], cost["upload_s"])
    finally:
        sync.close()


def prune_trunk_in_store(store: ObjectStore, task: Any) -> int:
    """A trunk's fork points (`retention.prune_trunk`) pruned in the store, from manifest-only views of
    the trunk and its branches in this node's scratch (removed after)."""
    import shutil

    from orchestrator.worker.retention import prune_trunk

    trunk = task.name if task.role == "trunk" else task.fork.trunk
    views = Path(task.store.scratch) / "views" / f"{task.name}.{secrets.token_hex(4)}"
    try:
        for name in (trunk, *(b.name for b in task.branches)):
            pull_trial(store, name, views / name, checkpoints="manifests")
        view = TrialDir(views / trunk)

        def delete(it: int) -> int:
            rel = view.checkpoint(it).relative_to(view.path).as_posix()
            manifest = store.manifest(f"{trial_key(trunk)}/{rel}") or {}
            store.delete_committed(f"{trial_key(trunk)}/{rel}")
            return int(manifest.get("size", 0))

        return prune_trunk(view, task.branches, task.keep_checkpoints, delete=delete)
    finally:
        shutil.rmtree(views, ignore_errors=True)
