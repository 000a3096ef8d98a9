"""Up-front checks of a COCO instances split: every defect found in one pass, before any training step.

Owns `AnnotationFile` (a JSON file read at most once, with its content hash) and `check_split`,
which looks at the annotation file and its image folder together:

* every annotation's `image_id` is a listed image and its `category_id` a listed category;
* every listed image file exists and its header size equals the JSON's width x height (a mismatch
  is an error; `data.allow_size_mismatch` turns it into a warning with the count);
* RLE sizes (crowd regions and RLE objects) equal their image's size;
* boxes are finite with positive width and height; the others are degenerate and dropped from
  training, which is logged with their count (not an error).

Each kind of failure becomes one clause "N <what> (first: a, b, c)"; all clauses of a split make one
`DatasetError` line, so the CLI exits 2 with one line. A passing check is cached in `cache_dir`,
keyed by the annotation file's hash and the image folder, so a sweep's trials pay for it once; a
failing one is not cached, so fixing the image files is noticed without touching the JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from trainer.atomic import write_atomic
from trainer.errors import DatasetError

logger = logging.getLogger(__name__)

CHECK_VERSION = 1
FIRST = 3  # offenders named per clause


class AnnotationFile:
    """A COCO JSON file; `.data` parses it on first use, `.digest` hashes its bytes on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data: dict[str, Any] | None = None
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            self._digest = h.hexdigest()
        return self._digest

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            try:
                with open(self.path, "rb") as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{self.path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
            if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                     for k in ("images", "annotations", "categories")):
                raise DatasetError(f"{self.path}: not a COCO instances file (needs 'images', 'annotations' "
                                   f"and 'categories' lists)")
            self._data = data
        return self._data

    def drop(self) -> None:
        """Forget the parsed JSON (the train index keeps only numpy buffers)."""
        self._data = None


def default_cache_dir(ann_file: Path) -> Path:
    return Path(ann_file).parent / ".trainer_cache"


def cache_file(cache_dir: Path, ann: AnnotationFile, kind: str, *extra: str) -> Path:
    """`{cache_dir}/{annotation hash}-{kind}-{hash of extra}`: one name per annotation content."""
    tag = hashlib.sha256("\0".join([str(CHECK_VERSION), *extra]).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{ann.digest[:32]}-{kind}-{tag}"


@contextlib.contextmanager
def cache_lock(path: Path | None):
    """Hold an exclusive lock beside a cache entry, so the ranks of a trial (and concurrent trials)
    build it once while the others wait and then read it; no lock if the folder is not writable."""
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_cache(path: Path, text: str) -> None:
    """Atomically write a cache file; an unwritable cache only logs."""
    try:
        write_atomic(path, text)
    except OSError as exc:
        logger.warning("cannot write dataset cache %s (%s); continuing without it", path, exc)


def _clause(count: int, what: str, offenders: list[str]) -> str:
    more = ", ..." if count > len(offenders) else ""
    return f"{count} {what} (first: {', '.join(offenders)}{more})"


def box_ok(bbox: Any) -> bool:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in values) and values[2] > 0 and values[3] > 0


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when the file is missing or unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError):
        return None


def _annotation_findings(data: dict[str, Any]) -> dict[str, tuple[int, list[str]]]:
    images = {img["id"]: img for img in data["images"]}
    cats = {c["id"] for c in data["categories"]}
    found: dict[str, list] = {"unlisted": [0, []], "category": [0, []], "crowd": [0, []], "degenerate": [0, []]}

    def hit(kind: str, text: str) -> None:
        entry = found[kind]
        entry[0] += 1
        if len(entry[1]) < FIRST:
            entry[1].append(text)

    for ann in data["annotations"]:
        aid, image_id = ann.get("id"), ann.get("image_id")
        img = images.get(image_id)
        if img is None:
            hit("unlisted", f"ann {aid} -> image {image_id}")
        if ann.get("category_id") not in cats:
            hit("category", f"ann {aid} -> category {ann.get('category_id')}")
        if not box_ok(ann.get("bbox")):
            hit("degenerate", f"ann {aid} bbox {ann.get('bbox')}")
        seg = ann.get("segmentation")
        if img is not None and isinstance(seg, dict):  # crowd regions, and COCO's RLE objects
            size = list(seg.get("size") or [])
            if size != [img.get("height"), img.get("width")]:
                hit("crowd", f"ann {aid} size {size} vs image {image_id} {[img.get('height'), img.get('width')]}")
    return {k: (v[0], v[1]) for k, v in found.items()}


def _file_findings(data: dict[str, Any], image_dir: Path) -> dict[str, tuple[int, list[str]]]:
    missing, mismatch = [0, []], [0, []]
    for n, img in enumerate(data["images"], 1):
        path = image_dir / str(img.get("file_name", ""))
        size = _header_size(path)
        if size is None:
            missing[0] += 1
            if len(missing[1]) < FIRST:
                missing[1].append(str(img.get("file_name")))
        elif size != (img.get("width"), img.get("height")):
            mismatch[0] += 1
            if len(mismatch[1]) < FIRST:
                mismatch[1].append(f"{img.get('file_name')} JSON {img.get('width')}x{img.get('height')} "
                                   f"file {size[0]}x{size[1]}")
        if n % 20000 == 0:
            logger.info("dataset check %s: %d/%d image headers read", image_dir, n, len(data["images"]))
    return {"missing": (missing[0], missing[1]), "mismatch": (mismatch[0], mismatch[1])}


_WHAT = {
    "category": "annotations have a category_id not in 'categories'",
    "unlisted": "annotations point at an image_id not in 'images'",
    "missing": "listed image files are missing or unreadable",
    "mismatch": "images differ in size between the JSON and the file",
    "crowd": "RLE masks (crowd regions or objects) differ in size from their image",
}


def check_split(ann: AnnotationFile, image_dir: Path, *, allow_size_mismatch: bool = False,
                cache_dir: Path | None = None) -> int:
    """Check one split (see the module docstring); return the count of degenerate boxes dropped.

    Raises a one-line DatasetError naming every failing kind with its count and first offenders.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir} (the images of {ann.path.name} belong there)")
    cache = cache_file(cache_dir, ann, "check", str(image_dir.resolve())) if cache_dir is not None else None
    with cache_lock(cache):
        return _check(ann, image_dir, allow_size_mismatch, cache)


def _check(ann: AnnotationFile, image_dir: Path, allow_size_mismatch: bool, cache: Path | None) -> int:
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            return _report(ann, cached, allow_size_mismatch)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring damaged dataset check cache %s", cache)
    findings = {**_annotation_findings(ann.data), **_file_findings(ann.data, image_dir)}
    findings = {k: [n, first] for k, (n, first) in findings.items()}
    dropped = _report(ann, findings, allow_size_mismatch)
    if cache is not None:
        text = json.dumps(findings)
        write_cache(cache, text)
    return dropped


def _report(ann: AnnotationFile, findings: dict[str, list], allow_size_mismatch: bool) -> int:
    errors = [_clause(findings[k][0], _WHAT[k], findings[k][1]) for k in _WHAT
              if findings[k][0] and not (k == "mismatch" and allow_size_mismatch)]
    if errors:
        raise DatasetError(f"dataset check of {ann.path}: " + "; ".join(errors))
    n, first = findings["mismatch"]
    if n:
        logger.warning("%s: %s (data.allow_size_mismatch is set: masks of these images may not fit)",
                       ann.path, _clause(n, _WHAT["mismatch"], first))
    n, first = findings["degenerate"]
    if n:
        logger.warning("%s: %s", ann.path, _clause(n, "annotations with a non-finite or empty box dropped", first))
    return n
