"""Up-front checks of a COCO split (instances or person keypoints): every defect found in one pass,
before the model is built, for the train and val splits of every detector alike.

Owns `AnnotationFile` (a JSON file read at most once, with its content hash, and the annotations and
images the check dropped) and `check_split`, which looks at the annotation file and its images:

* every annotation's `image_id` is a listed image and its `category_id` a listed category;
* every listed image file decodes fully (trainer.data.image_check, in a process pool: a truncated file
  with an intact header is found here) and its size equals the JSON's width x height (a mismatch is
  an error; `data.allow_size_mismatch` turns it into a warning with the count);
* polygons have at least 3 points, an even coordinate count and finite numbers; RLE sizes (crowd
  regions and RLE objects) equal their image's size;
* boxes are 4 finite numbers; finite boxes without a positive width and height are empty and
  dropped with a logged count.

Each kind of failure becomes one clause "N <what> (first: a, b, c)"; all clauses of a split make one
`DatasetError` line, so the CLI exits 2 with one line. `data.allow_unreadable_images`,
`allow_bad_segmentation` and `allow_bad_boxes` turn their kind into a logged drop instead. What is
dropped (an annotation, or an image with its annotations) leaves `AnnotationFile.data` itself, so it
is gone from training and from the evaluation ground truth alike. Findings (not verdicts) are cached
in `cache_dir`, keyed by the annotation file's hash, the image folder and the stat fingerprint of the
files in it, so a sweep's trials pay for the decode once and a repaired image is checked again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

from trainer.atomic import write_atomic
from trainer.errors import DatasetError
from trainer.data.image_check import decode_findings, fingerprint

logger = logging.getLogger(__name__)

CHECK_VERSION = 2
FIRST = 3  # offenders named per clause


class AnnotationFile:
    """A COCO JSON file; `.raw` parses it on first use, `.digest` hashes its bytes on first use, and
    `.data` is `.raw` without what `set_drops` named (annotation and image positions)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._raw: dict[str, Any] | None = None
        self._data: dict[str, Any] | None = None
        self._digest: str | None = None
        self.dropped_anns: frozenset[int] = frozenset()
        self.dropped_images: frozenset[int] = frozenset()

    def set_drops(self, anns: Iterable[int], images: Iterable[int]) -> None:
        self.dropped_anns, self.dropped_images = frozenset(anns), frozenset(images)
        self._data = None

    @property
    def drop_tag(self) -> str:
        """A name for the drops, part of cache keys of what is built from `.data` (the train index)."""
        if not (self.dropped_anns or self.dropped_images):
            return "none"
        text = f"{sorted(self.dropped_anns)}|{sorted(self.dropped_images)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            raw = self.raw
            if not (self.dropped_anns or self.dropped_images):
                return raw
            images = [im for k, im in enumerate(raw["images"]) if k not in self.dropped_images]
            gone = {raw["images"][k].get("id") for k in self.dropped_images}
            anns = [a for k, a in enumerate(raw["annotations"])
                    if k not in self.dropped_anns and a.get("image_id") not in gone]
            self._data = {**raw, "images": images, "annotations": anns}
        return self._data

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
    def raw(self) -> dict[str, Any]:
        if self._raw is None:
            try:
                with open(self.path, "rb") as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{self.path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
            if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                     for k in ("images", "annotations", "categories")):
                raise DatasetError(f"{self.path}: not a COCO instances file (needs 'images', 'annotations' "
                                   f"and 'categories' lists)")
            if not all(isinstance(x, dict) for key in ("images", "annotations") for x in data[key]):
                raise DatasetError(f"{self.path}: every entry of 'images' and 'annotations' must be an object")
            self._raw = data
        return self._raw

    def drop(self) -> None:
        """Forget the parsed JSON (the train index keeps only numpy buffers); the drops stay."""
        self._raw = self._data = None


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


def _numbers(values: Any) -> list[float] | None:
    if not isinstance(values, (list, tuple)) or any(isinstance(v, bool) for v in values):
        return None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def box_finite(bbox: Any) -> bool:
    """4 finite numbers (a box that can be scored at all)."""
    values = _numbers(bbox)
    return values is not None and len(values) == 4 and all(math.isfinite(v) for v in values)


def box_ok(bbox: Any) -> bool:
    """Finite with a positive width and height (a box that can train)."""
    return box_finite(bbox) and float(bbox[2]) > 0 and float(bbox[3]) > 0


def polygon_problem(poly: Any) -> str | None:
    """Why a COCO polygon cannot be rasterised, or None: >= 3 points, even count, finite numbers."""
    values = _numbers(poly)
    if values is None:
        return "is not a list of numbers"
    if len(values) % 2:
        return f"has an odd coordinate count ({len(values)})"
    if len(values) < 6:
        return f"has {len(values) // 2} points (at least 3 needed)"
    if not all(math.isfinite(v) for v in values):
        return "has a non-finite coordinate"
    return None


class _Findings(dict):
    """kind -> [count, first offenders, positions]; positions index 'annotations' or 'images'."""

    def hit(self, kind: str, position: int, text: str) -> None:
        entry = self.setdefault(kind, [0, [], []])
        entry[0] += 1
        entry[2].append(position)
        if len(entry[1]) < FIRST:
            entry[1].append(text)


def _segmentation_finding(found: _Findings, k: int, ann: dict, img: dict | None) -> None:
    seg, aid = ann.get("segmentation"), ann.get("id")
    if isinstance(seg, list):
        bad = next(((n, why) for n, why in ((n, polygon_problem(p)) for n, p in enumerate(seg)) if why), None)
        if bad:
            found.hit("polygon", k, f"ann {aid} polygon {bad[0]} {bad[1]}")
    elif img is not None and isinstance(seg, dict):  # crowd regions, and COCO's RLE objects
        size = list(seg.get("size") or [])
        if size != [img.get("height"), img.get("width")]:
            found.hit("crowd", k, f"ann {aid} size {size} vs image {ann.get('image_id')} "
                                  f"{[img.get('height'), img.get('width')]}")


def _annotation_findings(data: dict[str, Any]) -> _Findings:
    images = {img.get("id"): img for img in data["images"]}
    cats = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    found = _Findings()
    for k, ann in enumerate(data["annotations"]):
        aid, image_id = ann.get("id"), ann.get("image_id")
        img = images.get(image_id)
        if img is None:
            found.hit("unlisted", k, f"ann {aid} -> image {image_id}")
        if ann.get("category_id") not in cats:
            found.hit("category", k, f"ann {aid} -> category {ann.get('category_id')}")
        if not box_finite(ann.get("bbox")):
            found.hit("bad_box", k, f"ann {aid} bbox {ann.get('bbox')}")
        elif not box_ok(ann.get("bbox")):
            found.hit("empty_box", k, f"ann {aid} bbox {ann.get('bbox')}")
        _segmentation_finding(found, k, ann, img)
    return found


def _file_findings(data: dict[str, Any], image_dir: Path, workers: int) -> _Findings:
    entries = [(k, str(img.get("file_name", "")), img.get("width"), img.get("height"))
               for k, img in enumerate(data["images"])]
    found = _Findings()
    for pos, kind, detail in sorted(decode_findings(image_dir, entries, workers)):
        found.hit(kind, pos, detail)
    return found


_WHAT = {
    "category": "annotations have a category_id not in 'categories'",
    "unlisted": "annotations point at an image_id not in 'images'",
    "missing": "listed image files are missing or unreadable",
    "mismatch": "images differ in size between the JSON and the file",
    "crowd": "RLE masks (crowd regions or objects) differ in size from their image",
    "polygon": "annotations have a polygon of fewer than 3 points, an odd coordinate count or a non-number",
    "bad_box": "annotations have a bbox that is not 4 finite numbers",
}
# kinds a data.allow_* switch turns into a logged drop: (switch, dropped unit)
DROPPABLE = {"missing": ("allow_unreadable_images", "images"), "crowd": ("allow_bad_segmentation", "annotations"),
             "polygon": ("allow_bad_segmentation", "annotations"), "bad_box": ("allow_bad_boxes", "annotations")}
ALLOW_SWITCHES = ("allow_size_mismatch", "allow_unreadable_images", "allow_bad_segmentation", "allow_bad_boxes")


def check_split(ann: AnnotationFile, image_dir: Path, *, allow: Iterable[str] = (), allow_size_mismatch: bool = False,
                cache_dir: Path | None = None, workers: int = 0) -> int:
    """Check one split (see the module docstring), record its drops in `ann`; return how many
    annotations were dropped (empty boxes, and those an `allow` switch let go).

    `allow` holds the names of the set `data.allow_*` switches. Raises a one-line DatasetError naming
    every refused kind with its count and first offenders.
    """
    image_dir = Path(image_dir)
    allowed = set(allow) | ({"allow_size_mismatch"} if allow_size_mismatch else set())
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir} (the images of {ann.path.name} belong there)")
    cache = None
    if cache_dir is not None:
        cache = cache_file(cache_dir, ann, "check", str(image_dir.resolve()), fingerprint(image_dir))
    with cache_lock(cache):
        findings = _findings(ann, image_dir, cache, workers)
    return _report(ann, findings, allowed)


def _findings(ann: AnnotationFile, image_dir: Path, cache: Path | None, workers: int) -> dict[str, list]:
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if all(isinstance(v, list) and len(v) == 3 for v in cached.values()):
                return cached
        except ValueError:
            pass
        logger.warning("ignoring damaged dataset check cache %s", cache)
    findings = {**_annotation_findings(ann.raw), **_file_findings(ann.raw, image_dir, workers)}
    if cache is not None:
        write_cache(cache, json.dumps(findings))
    return findings


def _report(ann: AnnotationFile, findings: dict[str, list], allowed: set[str]) -> int:
    def refused(kind: str) -> bool:
        switch = "allow_size_mismatch" if kind == "mismatch" else DROPPABLE.get(kind, ("",))[0]
        return kind in findings and switch not in allowed

    errors = []
    for kind in _WHAT:
        if refused(kind):
            n, first, _ = findings[kind]
            hint = f" [data.{DROPPABLE[kind][0]}: true drops them]" if kind in DROPPABLE else ""
            errors.append(_clause(n, _WHAT[kind], first) + hint)
    if errors:
        raise DatasetError(f"dataset check of {ann.path}: " + "; ".join(errors))
    if "mismatch" in findings:
        n, first, _ = findings["mismatch"]
        logger.warning("%s: %s (data.allow_size_mismatch is set: masks of these images may not fit)",
                       ann.path, _clause(n, _WHAT["mismatch"], first))
    drop_anns, drop_images = set(findings.get("empty_box", [0, [], []])[2]), set()
    if "empty_box" in findings:
        n, first, _ = findings["empty_box"]
        logger.warning("%s: %s", ann.path, _clause(n, "annotations with an empty box dropped", first))
    for kind, (switch, unit) in DROPPABLE.items():
        if kind in findings:
            n, first, positions = findings[kind]
            (drop_images if unit == "images" else drop_anns).update(positions)
            logger.warning("%s: %s dropped from training and evaluation (data.%s is set)", ann.path,
                           _clause(n, _WHAT[kind], first), switch)
    ann.set_drops(drop_anns, drop_images)
    if drop_anns or drop_images:
        logger.info("%s: %d annotations and %d images dropped in all", ann.path, len(drop_anns), len(drop_images))
    return len(drop_anns)
