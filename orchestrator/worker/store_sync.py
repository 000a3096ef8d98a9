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

Order of a push (`TrialSync.push`): note the checkpoints on disk, push the metric rows, then upload
those checkpoints. The trainer writes a step's rows before its checkpoint, so a committed checkpoint
never has rows missing before it, and a resume from it never leaves a gap in the curve.

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

from orchestrator.worker.object_store import ObjectStore, hexdigest
from trainer.atomic import write_atomic
from trainer.trial_dir import LOCK, MANIFEST, METRICS, TrialDir

logger = logging.getLogger(__name__)

BIG = ".pt"
PUSH_INTERVAL_S = 2.0


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
            gen, _, seq = name[:-6].partition("-")
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


def pull_trial(store: ObjectStore, name: str, folder: str | Path, checkpoints: str = "all") -> dict[str, Any]:
    """Make `folder` the store's view of task `name`; `checkpoints`: "all" (verified bytes), "manifests"
    (a manifest file beside where each would be: `TrialDir.has_checkpoint` counts them) or a relative
    key of the one to fetch (a branch's fork checkpoint in its trunk's folder). Returns what it did."""
    folder, prefix = Path(folder), trial_key(name)
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
        if rel not in wanted or which not in ("all", rel):
            path.unlink()
            dropped.append(rel)
    for rel in wanted:
        local = folder / rel
        if which == "manifests":
            write_atomic(local.with_name(local.name + MANIFEST), store.get_bytes(f"{prefix}/{rel}{MANIFEST}") or b"")
            continue
        if which not in ("all", rel):
            continue
        manifest = store.manifest(f"{prefix}/{rel}")
        if manifest and local.exists() and local.stat().st_size == manifest["size"] \
                and hexdigest(local) == manifest["sha256"]:
            got.append(rel)  # this node has it already (an earlier attempt here)
            continue
        if store.get_verified(f"{prefix}/{rel}", local, manifest):
            got.append(rel)
        elif local.exists():
            local.unlink()
    return got, dropped


class TrialSync:
    """Pushes one attempt's trial folder to the store: periodically from a thread, and whole at `close`."""

    def __init__(self, store: ObjectStore, folder: TrialDir, attempt: int,
                 peers: tuple[TrialDir, ...] = ()):
        self.store, self.folder, self.prefix = store, folder, trial_key(folder.name)
        self.stream = f"{attempt:04d}.{secrets.token_hex(4)}"
        self.peers = peers  # folders this process may prune (a branch's trunk): deletions only
        self.pushed: dict[str, tuple[int, int]] = {}  # small file -> (size, mtime) pushed
        self.big = {d.path: self._big_here(d) for d in (folder, *peers)}  # what the store has committed
        self.inode, self.offset, self.gen, self.seq = None, 0, -1, 0
        self.uploads: list[tuple[str, int, float]] = []  # (key, bytes, seconds): the upload cost
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._push_lock = threading.Lock()

    @staticmethod
    def _big_here(folder: TrialDir) -> dict[str, tuple[int, int]]:
        out = {}
        for path in folder.path.rglob(f"*{BIG}") if folder.path.exists() else ():
            st = path.stat()
            out[path.relative_to(folder.path).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def start(self, interval: float = PUSH_INTERVAL_S) -> "TrialSync":
        def loop() -> None:
            while not self._stop.is_set():
                self._wake.wait(interval)
                self._wake.clear()
                try:
                    self.push()
                except Exception as exc:  # the store unreachable a while: the next pass tries again
                    logger.warning("push to %s failed (%s: %s); retrying", self.store.uri, type(exc).__name__, exc)

        self._thread = threading.Thread(target=loop, name="store-push", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Stop the thread and push what is left (an error here fails the attempt: nothing may be lost)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.push()

    def push(self) -> None:
        with self._push_lock:
            on_disk = self._big_here(self.folder)  # first: rows written before a checkpoint go out before it
            self._push_metrics()
            self._push_files()
            self._push_big(self.folder, on_disk)
            for peer in self.peers:
                self._push_big(peer, self._big_here(peer), deletions_only=True)

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
        if data or self.seq == 0:
            self.store.put_bytes(self._stream_key("metrics", f"{self.gen:02d}-{self.seq:06d}.jsonl"), data)
            self.offset += len(data)
            self.seq += 1

    def _push_files(self) -> None:
        for path in sorted(self.folder.path.iterdir()) if self.folder.path.exists() else ():
            name = path.name
            if not path.is_file() or name.startswith(".") or name in (METRICS, LOCK) or name.endswith(BIG) \
                    or name.endswith(MANIFEST):
                continue
            st = path.stat()
            if self.pushed.get(name) == (st.st_size, st.st_mtime_ns):
                continue
            self.store.put_bytes(self._stream_key("files", name), path.read_bytes())
            self.pushed[name] = (st.st_size, st.st_mtime_ns)

    def _push_big(self, folder: TrialDir, on_disk: dict[str, tuple[int, int]], deletions_only: bool = False) -> None:
        known, prefix = self.big[folder.path], trial_key(folder.name)
        for rel in sorted(set(known) - set(on_disk)):  # pruned here since: pruned in the store
            self.store.delete_committed(f"{prefix}/{rel}")
            del known[rel]
        if deletions_only:
            return
        for rel, stamp in sorted(on_disk.items()):
            if known.get(rel) == stamp:
                continue
            t0 = time.perf_counter()
            try:
                manifest = self.store.put_file(folder.path / rel, f"{prefix}/{rel}")
            except FileNotFoundError:
                continue  # pruned between the listing and the upload
            self.uploads.append((rel, manifest["size"], time.perf_counter() - t0))
            logger.info("uploaded %s/%s (%.1f MB in %.2f s)", prefix, rel, manifest["size"] / 1e6,
                        self.uploads[-1][2])
            known[rel] = stamp

    def upload_cost(self) -> dict[str, float]:
        """The checkpoints this attempt uploaded: count, MB and seconds (recorded in its segments row)."""
        ckpts = [(b, s) for rel, b, s in self.uploads if rel.startswith("checkpoints/")]
        return {"uploads": len(ckpts), "upload_mb": round(sum(b for b, _ in ckpts) / 1e6, 3),
                "upload_s": round(sum(s for _, s in ckpts), 3)}


# ----------------------------------------------------------------------------------------------
# One attempt of a task on object storage (`orchestrator.worker.trainable`)


def open_store(task: Any) -> ObjectStore | None:
    """The sweep's store of an object-store task (`Task.store`), or None: the sweep folder is shared."""
    return ObjectStore.from_uri(task.store.uri) if task.store is not None else None


def fetch_fork(store: ObjectStore, task: Any) -> Path | None:
    """A branch's fork checkpoint, fetched from its trunk's committed objects and verified, or None."""
    source = task.fork_checkpoint()
    key = f"{trial_key(task.fork.trunk)}/{source.parent.name}/{source.name}"
    dest = task.fork_copy()
    return dest if store.get_verified(key, dest) else None


def finish_sync(sync: TrialSync, attempt: int) -> None:
    """The attempt's last push, with its upload cost in attempts.jsonl (pushed with it)."""
    from trainer.trial_dir import ATTEMPTS

    try:
        sync.push()  # first: the cost row covers every upload
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
