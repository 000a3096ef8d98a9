"""Image files of a split: the one decoder the loaders use, and the full-decode pass of the up-front check.

Owns `read_image` (uint8 RGB pixels of a file, or a one-line DatasetError naming it; every detector's
loader and the check call it, so what the check accepts the loaders can read) and `decode_findings`,
which decodes every listed file fully, in a process pool, and reports the files that are missing or
undecodable (a truncated PNG or JPEG whose header is intact included) and those whose decoded size
differs from the JSON. `fingerprint` hashes the name, size and modification time of every file in
the image folder: part of the check cache's key, so a replaced or repaired image file is checked
again, while a warm check still reads neither an image nor the annotation JSON.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torchvision.io import ImageReadMode, decode_image

from trainer.errors import DatasetError

logger = logging.getLogger(__name__)

CHUNK = 64  # files per pool job: big enough to amortise the pickling, small enough to balance
POOL_MIN = 4 * CHUNK  # below this many files the pool's start-up costs more than it saves


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB pixels of an image file, or a DatasetError naming it."""
    try:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        return decode_image(data, mode=ImageReadMode.RGB)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = reason.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1] if ".cpp:" in reason else reason  # torchvision's
        raise DatasetError(f"cannot read image {path}: {reason}") from None


def _walk(folder: str) -> Iterator[os.DirEntry]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):  # hidden: e.g. a .trainer_cache kept beside the images
                continue
            if entry.is_dir():
                yield from _walk(entry.path)
            else:
                yield entry


def fingerprint(image_dir: Path) -> str:
    """sha256 of (path, size, mtime) of every file under `image_dir` (links followed): a directory
    listing and a stat each, no file read and no annotation file parsed."""
    rows = []
    for entry in _walk(str(image_dir)):
        try:
            st = entry.stat()
            rows.append(f"{entry.path}\0{st.st_size}\0{st.st_mtime_ns}\n")
        except OSError:  # a dangling link: unreadable, and so part of what is checked
            rows.append(f"{entry.path}\0-\n")
    return hashlib.sha256("".join(sorted(rows)).encode()).hexdigest()


Entry = tuple[int, str, int, int]  # (position in 'images', file name, JSON width, JSON height)
Finding = tuple[int, str, str]  # (position, "missing" | "mismatch", detail)


def _decode_chunk(image_dir: str, entries: Sequence[Entry]) -> list[Finding]:
    found = []
    for pos, name, width, height in entries:
        path = Path(image_dir) / name
        if not path.is_file():
            found.append((pos, "missing", name))
            continue
        try:
            h, w = read_image(path).shape[-2:]
        except DatasetError as exc:
            found.append((pos, "missing", f"{name}: {str(exc).rpartition(': ')[2][:80]}"))
            continue
        if (w, h) != (width, height):
            found.append((pos, "mismatch", f"{name} JSON {width}x{height} file {w}x{h}"))
    return found


def _single_thread() -> None:
    torch.set_num_threads(1)  # one decode per process; the pool is the parallelism


def decode_findings(image_dir: Path, entries: Sequence[Entry], workers: int = 0) -> list[Finding]:
    """Decode every entry's file fully; the missing, undecodable and wrongly sized ones, by position.

    `workers` processes (0: one per CPU) decode chunks of CHUNK files; small sets decode inline.
    """
    workers = workers or os.cpu_count() or 1
    chunks = [entries[k:k + CHUNK] for k in range(0, len(entries), CHUNK)]
    if workers == 1 or len(entries) < POOL_MIN:
        return [f for chunk in chunks for f in _decode_chunk(str(image_dir), chunk)]
    found: list[Finding] = []
    # fork, as the loaders' workers do: no re-import of torch per process
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("fork"),
                             initializer=_single_thread) as pool:
        step = max(len(chunks) // 10, 1)
        for n, part in enumerate(pool.map(_decode_chunk, [str(image_dir)] * len(chunks), chunks), 1):
            found += part
            if n % step == 0 and len(entries) >= 10_000:
                logger.info("dataset check %s: %d/%d images decoded", image_dir, min(n * CHUNK, len(entries)),
                            len(entries))
    return found
