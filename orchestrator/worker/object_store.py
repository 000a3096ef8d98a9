"""A sweep's objects on S3-compatible storage (or GCS): whole objects, committed by a manifest.

Object stores have no append, no rename and no lock, and an object is replaced whole by a PUT. What this
module guarantees on top of that, through pyarrow's file systems (the client Ray Tune uses; the endpoint
and credentials come from the environment as pyarrow reads them: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...):

- Big files (checkpoints, weights) are *committed*: `put_file` streams the bytes to a staging key, has
  the store copy them to the final key (one CopyObject: the object appears whole or not at all), then
  writes `<key>.manifest.json` = {"size", "sha256"}. A reader trusts a big object only when its
  manifest exists and the bytes it downloaded match it (`get_verified`). The staging step matters:
  pyarrow's output stream completes a multipart upload when it is closed, and a `with` block closes it
  on an exception, so a failed upload leaves a truncated object, here only under the staging key
  (deleted at once). A process killed midway leaves an unfinished multipart upload, which no listing
  shows (a bucket lifecycle rule aborts those) and, if killed between copy and manifest, an object
  without a manifest, which no reader loads.
- Small objects (JSON, metric chunks, logs) are written in one PUT (`put_bytes`) and read whole.

Keys are relative to the store's root (`s3://bucket/prefix` -> "bucket/prefix" in pyarrow's terms).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

from trainer.atomic import write_atomic
from trainer.trial_dir import MANIFEST

logger = logging.getLogger(__name__)

SCHEMES = ("s3://", "gs://")
_BLOCK = 8 << 20
STAGING = ".uploads"  # under the store's root: where big objects are written before their copy to the final key


def is_store_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SCHEMES)


def split_uri(uri: str) -> tuple[str, str]:
    """("s3", "bucket/prefix") of a store URI, without a trailing slash."""
    scheme, _, rest = uri.partition("://")
    return scheme, rest.strip("/")


class ObjectStore:
    """The objects under one root of an S3/GCS bucket."""

    def __init__(self, fs: Any, root: str, uri: str):
        self.fs, self.root, self.uri = fs, root.strip("/"), uri.rstrip("/")

    @classmethod
    def from_uri(cls, uri: str) -> "ObjectStore":
        from pyarrow import fs as pafs

        filesystem, root = pafs.FileSystem.from_uri(uri)
        return cls(filesystem, root, uri)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key.strip('/')}" if key else self.root

    # -- small objects ------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes | str) -> None:
        with self.fs.open_output_stream(self._path(key)) as out:
            out.write(data.encode() if isinstance(data, str) else data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._path(key)) as src:
                return src.read()
        except FileNotFoundError:
            return None
        except OSError as exc:  # pyarrow says "NoSuchKey"/"Path does not exist" as OSError on some versions
            if "does not exist" in str(exc) or "NoSuchKey" in str(exc):
                return None
            raise

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data) if data is not None else None
        except json.JSONDecodeError:
            return None

    def list(self, prefix: str = "", recursive: bool = True) -> dict[str, tuple[int, int]]:
        """key (relative to the root) -> (size, mtime in ns) of every object under `prefix`."""
        from pyarrow import fs as pafs

        base = self._path(prefix)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        cut = len(self.root) + 1
        return {i.path[cut:]: (int(i.size or 0), int(i.mtime_ns or 0))
                for i in infos if i.type == pafs.FileType.File}

    def folders(self, prefix: str) -> list[str]:
        """The names of the "folders" right under `prefix` (common prefixes of its keys)."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._path(prefix), recursive=False, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass

    # -- committed (big) objects ---------------------------------------------------------------
    def put_file(self, local: str | Path, key: str, source: BinaryIO | None = None) -> dict[str, Any]:
        """Upload a file's bytes (or `source`'s) to `key`, then commit them with its manifest; returns it.

        The bytes go to a staging key first and are copied to `key` by the store (one CopyObject: the
        object appears whole), because pyarrow completes a multipart upload whose stream is closed on
        an exception: a failed upload leaves a truncated object only under the staging key, removed here."""
        digest, size = hashlib.sha256(), 0
        staging = f"{STAGING}/{secrets.token_hex(8)}/{key.rsplit('/', 1)[-1]}"
        try:
            with (source if source is not None else open(local, "rb")) as src, \
                    self.fs.open_output_stream(self._path(staging)) as out:
                while block := src.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
            self.fs.copy_file(self._path(staging), self._path(key))
        finally:
            self.delete(staging)
        manifest = {"size": size, "sha256": digest.hexdigest()}
        self.put_bytes(key + MANIFEST, json.dumps(manifest))  # the commit: written only after the bytes
        return manifest

    def manifest(self, key: str) -> dict[str, Any] | None:
        found = self.get_json(key + MANIFEST)
        return found if isinstance(found, dict) and {"size", "sha256"} <= set(found) else None

    def get_verified(self, key: str, local: str | Path, manifest: dict[str, Any] | None = None) -> bool:
        """Download a committed object to `local` (atomically) if its bytes match its manifest."""
        manifest = manifest or self.manifest(key)
        if manifest is None:
            return False
        digest, size = hashlib.sha256(), 0

        def copy(fh: BinaryIO) -> None:
            nonlocal size
            with self.fs.open_input_stream(self._path(key)) as src:
                while block := src.read(_BLOCK):
                    digest.update(block)
                    fh.write(block)
                    size += len(block)
            if size != manifest["size"] or digest.hexdigest() != manifest["sha256"]:
                raise _Mismatch(f"{key}: {size} bytes, sha256 {digest.hexdigest()[:12]}; manifest says "
                                f"{manifest['size']} bytes, {str(manifest['sha256'])[:12]}")

        try:
            write_atomic(local, copy)
        except (_Mismatch, FileNotFoundError) as exc:
            logger.warning("not using %s/%s: %s", self.uri, key, exc)
            return False
        return True

    def delete_committed(self, key: str) -> None:
        """Manifest first: a reader never trusts an object whose deletion has begun."""
        self.delete(key + MANIFEST)
        self.delete(key)


class _Mismatch(Exception):
    pass


def hexdigest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def credentials_hint() -> str:
    """Which of the usual credential variables are set (names only: values never leave the process)."""
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_REGION",
             "GOOGLE_APPLICATION_CREDENTIALS")
    return ", ".join(n for n in names if os.environ.get(n)) or "none of AWS_*/GOOGLE_APPLICATION_CREDENTIALS"


def periodic(fn: Any, interval: float, stop: Any, name: str, uri: str) -> Any:
    """A daemon thread calling `fn` every `interval` s until `stop` (a threading.Event) is set; a failing
    pass is logged and the next one tries again (a store unreachable a while)."""
    import threading

    def loop() -> None:
        while not stop.wait(interval):
            try:
                fn()
            except Exception as exc:  # pyarrow's errors differ by store and version
                logger.warning("object store %s: %s: %s: %s; retrying", uri, name, type(exc).__name__, exc)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
